"""Placement of learners and rollout workers from `cfg.ray`: the configurations the
README describes validate, impossible ones are one clear error, and on a real Ray
cluster (with GPUs declared to Ray, none used) the workers get the GPUs they should."""

from __future__ import annotations

import sys
import time

import pytest

from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config, load_offline_config
from rlpost.jobs.session import init_ray
from rlpost.workers.group import Placement, WorkerGroup
from tests.run_helpers import ROOT, TINY

# README "Clusters": a 1-node 8-GPU and a 4-node (32-GPU) layout, each way
LAYOUTS = {
    "1 node, separate": [
        "learner.num_learners=4",
        "ray.gpus_per_learner=1",
        "rollout.num_workers=2",
        "ray.gpus_per_rollout_worker=2",
        "rollout.vllm.tensor_parallel_size=2",
    ],
    "1 node, colocated": [
        "ray.placement=colocated",
        "learner.num_learners=8",
        "ray.gpus_per_learner=1",
        "rollout.num_workers=8",
        "rollout.vllm.gpu_memory_utilization=0.4",
    ],
    "4 nodes, separate": [
        "learner.num_learners=16",
        "ray.gpus_per_learner=1",
        "rollout.num_workers=4",
        "ray.gpus_per_rollout_worker=4",
        "rollout.vllm.tensor_parallel_size=4",
    ],
    "4 nodes, colocated": [
        "ray.placement=colocated",
        "learner.num_learners=32",
        "ray.gpus_per_learner=1",
        "rollout.num_workers=32",
        "rollout.vllm.gpu_memory_utilization=0.4",
    ],
}
RAY = ["mode=ray", "rollout.engine=vllm", "rollout.prompts_per_step=32"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_readme_layouts_validate(layout):
    cfg = load_config(TINY, RAY + LAYOUTS[layout])
    assert cfg.ray.placement == ("colocated" if "colocated" in layout else "separate")


@pytest.mark.parametrize(
    "overrides, error",
    [
        (
            ["rollout.vllm.tensor_parallel_size=2", "ray.gpus_per_rollout_worker=1"],
            "ray.gpus_per_rollout_worker (1) must equal rollout.vllm.tensor_parallel_size (2): "
            "a vLLM engine holds one GPU per tensor-parallel rank",
        ),
        (
            ["ray.placement=colocated", "ray.gpus_per_learner=2"],
            "ray.placement=colocated puts each learner rank on one GPU (or none): "
            "ray.gpus_per_learner must be 0 or 1 (got 2)",
        ),
        (
            ["ray.placement=colocated", "ray.gpus_per_rollout_worker=1"],
            "ray.gpus_per_rollout_worker is for ray.placement=separate; colocated rollout workers "
            "share the learners' GPUs (set it to 0)",
        ),
        (
            ["ray.placement=colocated", "rollout.vllm.tensor_parallel_size=2"],
            "ray.placement=colocated runs one vLLM engine per GPU: set "
            "rollout.vllm.tensor_parallel_size=1 or ray.placement=separate",
        ),
        (
            ["ray.placement=colocated", "rollout.num_workers=2"],
            "ray.placement=colocated: rollout.num_workers (2) must not exceed learner.num_learners "
            "(1); each rollout worker shares the GPU of one learner rank",
        ),
        (["ray.placement=nearby"], "key 'ray.placement': Input should be 'separate' or 'colocated'"),
        (
            ["ray.rollout_resources={gpu: 1}"],
            "key 'ray.rollout_resources': 'gpu' is one of Ray's own resources (a bundle's CPU and "
            "GPUs come from ray.gpus_per_learner / ray.gpus_per_rollout_worker); name custom "
            "resources that nodes offer (ray start --resources)",
        ),
        (
            ["ray.learner_resources={train_node: 0}"],
            "key 'ray.learner_resources.train_node': Input should be greater than 0 (got 0)",
        ),
        (
            ["ray.placement=colocated", "ray.rollout_resources={inference_node: 1}"],
            "ray.rollout_resources is for ray.placement=separate; colocated rollout workers "
            "share the learners' bundles, which ray.learner_resources places",
        ),
    ],
)
def test_impossible_placements_are_config_errors(overrides, error):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, RAY + overrides)
    assert str(e.value).startswith(f"{TINY} (with overrides): {error}")


@pytest.mark.parametrize("placement", ["separate", "colocated"])
def test_custom_resources_go_into_their_roles_bundles(monkeypatch, placement):
    monkeypatch.setattr(Placement, "_group", lambda self, bundles: bundles)  # the "group": its bundles
    overrides = ["learner.num_learners=2", "ray.learner_resources={train_node: 1, big_memory: 0.5}"]
    if placement == "separate":
        overrides.append("ray.rollout_resources={inference_node: 2}")
    placed = Placement(load_config(TINY, RAY + overrides + [f"ray.placement={placement}"]), use_ray=True)
    learner = {"train_node": 1, "big_memory": 0.5}
    if placement == "separate":
        assert placed.slots("learner").pg == [{"CPU": 1, **learner}] * 2
        assert placed.slots("rollout").pg == [{"CPU": 1, "inference_node": 2}]
    else:  # rank 0's bundle holds its rollout worker's CPU too
        assert placed.slots("learner").pg == [{"CPU": 2, **learner}, {"CPU": 1, **learner}]
        assert placed.slots("rollout").pg is placed.slots("learner").pg


def test_offline_jobs_pin_learners_only(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    sft = ROOT / "tests" / "configs" / "sft_tiny.yaml"
    cfg = load_offline_config("sft", sft, [f"data.path={pairs}", "ray.learner_resources={train_node: 1}"])
    assert cfg.ray.learner_resources == {"train_node": 1}
    for override, error in [
        (
            "ray.learner_resources={CPU: 1}",
            "key 'ray.learner_resources': 'CPU' is one of Ray's own resources",
        ),
        ("ray.rollout_resources={inference_node: 1}", "unknown key 'ray.rollout_resources'"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_offline_config("sft", sft, [f"data.path={pairs}", override])
        assert str(e.value).startswith(f"{sft} (with overrides): {error}")


class Probe:
    """A worker that reports the GPUs Ray gave it."""

    def __init__(self, rank: int):
        self.rank = rank

    def ping(self) -> bool:
        return True

    def gpus(self) -> list[str]:
        import ray

        return sorted(str(g) for g in ray.get_gpu_ids())

    def shutdown(self) -> None:
        pass


def placed_gpus(cfg) -> tuple[list[list[str]], list[list[str]]]:
    placement = Placement(cfg, use_ray=True)
    learners = WorkerGroup(
        Probe, cfg.learner.num_learners, lambda r: {"rank": r}, True, slots=placement.slots("learner")
    )
    rollout = WorkerGroup(
        Probe, cfg.rollout.num_workers, lambda r: {"rank": r}, True, slots=placement.slots("rollout")
    )
    try:
        return learners.call("gpus"), rollout.call("gpus")
    finally:
        learners.shutdown()
        rollout.shutdown()
        placement.shutdown()


@pytest.mark.slow
def test_workers_get_their_gpus_on_a_ray_cluster():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    # 4 GPUs declared to Ray (none is used): Ray's bookkeeping is what is tested
    ray.init(
        num_cpus=8, num_gpus=4, resources={"train_node": 1}, include_dashboard=False, log_to_driver=False
    )
    try:
        learners, rollout = placed_gpus(
            load_config(
                TINY,
                RAY
                + [
                    "learner.num_learners=2",
                    "ray.gpus_per_learner=1",
                    "rollout.num_workers=1",
                    "ray.gpus_per_rollout_worker=2",
                    "rollout.vllm.tensor_parallel_size=2",
                ],
            )
        )
        assert [len(g) for g in learners] == [1, 1] and len(rollout[0]) == 2
        assert len({g for ids in learners + rollout for g in ids}) == 4  # no GPU shared

        learners, rollout = placed_gpus(
            load_config(
                TINY,
                RAY
                + [
                    "ray.placement=colocated",
                    "learner.num_learners=4",
                    "ray.gpus_per_learner=1",
                    "rollout.num_workers=2",
                ],
            )
        )
        assert all(len(g) == 1 for g in learners) and len({g[0] for g in learners}) == 4
        assert rollout == learners[:2]  # rollout worker r on learner r's GPU
        deadline = time.time() + 30  # placement groups are removed asynchronously
        while ray.available_resources().get("GPU") != 4 and time.time() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("GPU") == 4  # every group released

        with pytest.raises(ConfigError) as e:  # not a placement group that waits forever
            init_ray(load_config(TINY, RAY + ["ray.rollout_resources={inference_node: 1}"]).ray, 1)
        assert str(e.value) == (
            "key 'ray.rollout_resources': no node of the Ray cluster offers the resource "
            "'inference_node' (start the nodes meant for it with ray start "
            "--resources='{\"inference_node\": N}')"
        )
        # a group without a Placement (an offline job's learners) asks for them too
        group = WorkerGroup(Probe, 1, lambda r: {"rank": r}, True, resources={"train_node": 1})
        try:
            assert ray.util.placement_group_table(group.pg)["bundles"] == {0: {"CPU": 1, "train_node": 1}}
        finally:
            group.shutdown()
    finally:
        ray.shutdown()
