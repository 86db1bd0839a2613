"""Multi-node runs on one machine: a Ray cluster of simulated nodes (`ray.cluster_utils.Cluster`
starts one raylet per node, each with its own resources), learners pinned to the nodes that
offer `learner_node` and rollout workers to the one that offers `rollout_node`
(`ray.learner_resources`, `ray.rollout_resources`). The weights cross nodes at every sync,
and the engine's log-probs must still match the learners'."""

from __future__ import annotations

import pytest

from rlpost.jobs.preflight import load_config
from rlpost.jobs.rl import Trainer
from rlpost.jobs.run_dir import prepare_run_dir
from tests.run_helpers import TINY, read_metrics

pytestmark = pytest.mark.slow

LEARNER, ROLLOUT = "learner_node", "rollout_node"
STEPS = 3


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPU (the driver's side and the CPU-less reward actors), two learner
    nodes offering one learner each (so two ranks must spread), and a rollout node."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for resources in ({LEARNER: 1}, {LEARNER: 1}, {ROLLOUT: 1}):
            cluster.add_node(num_cpus=1, resources=resources)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


class NodeRecorder(Trainer):
    """The RL job, noting where each worker runs once both groups are up."""

    def start_rollout(self, model_dir):
        import ray

        group = super().start_rollout(model_dir)
        self.offers = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        self.nodes = {"learner": self.learners.call("node_id"), "rollout": group.call("node_id")}
        return group


def train_on(cluster, tmp_path, *overrides: str) -> tuple[NodeRecorder, dict[int, dict]]:
    import ray

    cfg = load_config(
        TINY,
        [
            f"output_dir={tmp_path}",
            "mode=ray",
            "warmup.steps=0",
            f"steps={STEPS}",
            "eval_every=0",
            "reward.num_workers=1",
            # the untrained policy never answers right: reward answers that start with a
            # digit instead, so the groups differ, the policy moves and the syncs carry it
            'reward.components=[{name: format, args: {pattern: "[0-9].*"}}]',
            f"ray.address={cluster.address}",
            f"ray.learner_resources={{{LEARNER}: 1}}",
            f"ray.rollout_resources={{{ROLLOUT}: 1}}",
            *overrides,
        ],
    )
    trainer = NodeRecorder(cfg, prepare_run_dir(cfg))
    try:
        result = trainer.run()
    finally:
        trainer.shutdown()
        ray.shutdown()  # the next test's job connects again, as a new driver
    return trainer, read_metrics(result.run_dir)


def assert_placed_and_synced(trainer: NodeRecorder, metrics: dict[int, dict], learners: int) -> None:
    learner_nodes, (rollout_node,) = trainer.nodes["learner"], trainer.nodes["rollout"]
    assert len(set(learner_nodes)) == learners  # one rank per learner node
    assert all(LEARNER in trainer.offers[n] for n in learner_nodes)
    assert ROLLOUT in trainer.offers[rollout_node] and rollout_node not in learner_nodes
    assert sorted(metrics) == list(range(STEPS + 1))
    # an update before the last step: a later step sampled from weights a sync carried across nodes
    assert any(metrics[s]["grad_norm"] > 0 for s in range(1, STEPS))
    for step in range(1, STEPS + 1):
        assert metrics[step]["logprob_gap/rollout_vs_learner_max"] < 1e-4, step


def test_learner_and_rollout_on_two_nodes(cluster, tmp_path):
    trainer, metrics = train_on(cluster, tmp_path)
    assert_placed_and_synced(trainer, metrics, learners=1)


def test_two_learner_ranks_on_two_nodes(cluster, tmp_path):
    # each learner node offers one learner_node: the PACK group must spread the ranks,
    # which then rendezvous through rank 0's address
    trainer, metrics = train_on(cluster, tmp_path, "learner.num_learners=2")
    assert_placed_and_synced(trainer, metrics, learners=2)
