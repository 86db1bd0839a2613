"""PPO's critic (rlpost/workers/critic.py) on real DeepSpeed ranks.

The value head starts at zero, so V = 0 everywhere at the start; trained toward per-sample
returns, V moves to them and the explained variance rises from 0. The clipped value loss and
its gradients (value head and LM) equal an independent computation from the HF model's final
states, with old values picked so that both branches of the max occur, whatever the cut into
micro-batches (1, 2, 3 padded; by token budget packed) and on 2 Ray ranks. ZeRO stages 0, 1
and 2 train the same parameters and leave the unused (untied) output head as it was; a tied
one trains with the embeddings. A checkpoint restores the values and the optimizer (the next
step is the same).
Tolerance: fp32, rtol 1e-5 / atol 1e-7 on losses and gradients.
"""

from __future__ import annotations

import pytest
import torch

from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, shard
from rlpost.model.load import load_model
from rlpost.workers.critic import VALUE_HEAD_FILE, Critic
from rlpost.workers.group import WorkerGroup
from rlpost.workers.learner import start_learner_group
from rlpost.workers.policy_rank import LRSchedule
from tests.run_helpers import assert_gradients_match

RTOL, ATOL = 1e-5, 1e-7
LENGTHS = [(4, 1), (6, 5), (3, 9), (5, 2), (7, 3), (4, 7), (6, 1), (3, 4)]  # (prompt, response)
METRICS = {"critic/value_loss", "critic/value_mean", "critic/clip_frac", "critic/grad_norm", "critic/lr"}
# per rank: 1, 2 and 3 micro-batches (padded, by sequence count); packed, by token budget
SPLITS = {
    "padded": [dict(max_seqs=m) for m in (8, 4, 3)],
    "packed": [dict(max_tokens=t) for t in (None, 40, 12)],
}


def make_samples(seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (p_len, r_len) in enumerate(LENGTHS):
        ids = torch.randint(3, 15, (p_len + r_len,), generator=g).tolist()
        samples.append(Sample(prompt_ids=[1] + ids[:p_len], response_ids=ids[p_len:], group=i // 4))
    return samples


def set_targets(samples: list[Sample], returns: list[torch.Tensor], old_values: list[torch.Tensor]) -> None:
    """What the controller gives a mini-batch: R_t, V_old and weights 1 / its token count."""
    tokens = sum(s.num_tokens for s in samples)
    for s, r, v in zip(samples, returns, old_values):
        s.extra = {"returns": r.float(), "old_values": v.float()}
        s.weights = torch.full((s.num_tokens,), 1.0 / tokens, dtype=torch.float64)


def toward_one(samples: list[Sample]) -> None:
    """Returns 1 at every token, old values 0 (past V = 0.2 the clipped branch is the larger)."""
    set_targets(
        samples, [torch.ones(s.num_tokens) for s in samples], [torch.zeros(s.num_tokens) for s in samples]
    )


def per_sample(flat: torch.Tensor, samples: list[Sample]) -> list[torch.Tensor]:
    return list(flat.split([s.num_tokens for s in samples]))


def critic_group(
    model_dir,
    world: int = 1,
    zero_stage: int = 0,
    packing: str = "padded",
    clip: float | None = 0.2,
    lr: float = 1e-2,
    warmup: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> WorkerGroup:
    cfg = TrainConfig(mode="ray" if world > 1 else "inprocess")
    cfg.critic.value_clip = clip
    cfg.learner.num_learners = world
    cfg.learner.zero_stage = zero_stage
    cfg.learner.packing = packing
    cfg.learner.grad_clip = grad_clip  # 0: exact gradients (DeepSpeed then reports no norm)
    cfg.learner.weight_decay = weight_decay
    return start_learner_group(
        cfg, model_dir, None, LRSchedule(lr, warmup), pad_id=0, use_ray=world > 1, role=Critic
    )


def values_of(group: WorkerGroup, samples: list[Sample], **split) -> torch.Tensor:
    """V of every response token of `samples`, in their order, from every rank's share."""
    parts = shard(samples, len(group), packed=group.call("is_packed")[0], **split)
    got = {}
    for rank, flat in zip(parts, group.call("values", per_rank=[(p,) for p in parts])):
        ordered = [s for micro in rank for s in micro]
        got.update({id(s): v for s, v in zip(ordered, per_sample(flat, ordered))})
    return torch.cat([got[id(s)] for s in samples])


def train(group: WorkerGroup, minibatches: list[list[Sample]], apply: bool = True, **split) -> list[dict]:
    """One step per mini-batch (or only the gradients of one, `apply` False); merged metrics."""
    packed = group.call("is_packed")[0]
    cuts = [shard(mb, len(group), packed=packed, **split) for mb in minibatches]
    if apply:
        results = group.call("train_values", per_rank=[([c[r] for c in cuts],) for r in range(len(group))])
    else:
        (cut,) = cuts
        results = [[m] for m in group.call("train_value_minibatch", per_rank=[(p, False) for p in cut])]
    merged = [results[0][i] for i in range(len(minibatches))]
    for rank in results[1:]:
        for m, other in zip(merged, rank):
            m.merge(other)
    return [m.result() for m in merged]


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    return float(1 - (returns - values).var() / returns.var())


def test_values_start_at_zero_and_learn_per_sample_returns(model_dir):
    samples = make_samples()
    returns = [torch.full((s.num_tokens,), 1.0 + 0.5 * (i % 3 - 1)) for i, s in enumerate(samples)]
    flat_returns = torch.cat(returns)
    # the defaults' ZeRO-1 and clipping: DeepSpeed reports the gradient norm (ZeRO-0 does not)
    group = critic_group(model_dir, zero_stage=1, grad_clip=1.0)
    try:
        for split in SPLITS["padded"]:
            assert torch.equal(values_of(group, samples, **split), torch.zeros(len(flat_returns)))
        values = torch.zeros(len(flat_returns))
        history = [(explained_variance(values, flat_returns), (values - flat_returns).abs().mean())]
        for _ in range(12):  # two mini-batches of 4 sequences a call, V_old refreshed each call
            old = per_sample(values, samples)
            minibatches = [samples[:4], samples[4:]]
            for mb in minibatches:
                idx = [samples.index(s) for s in mb]
                set_targets(mb, [returns[i] for i in idx], [old[i] for i in idx])
            metrics = train(group, minibatches, max_seqs=2)
            assert len(metrics) == 2 and all(set(m) == METRICS for m in metrics)
            values = values_of(group, samples)
            history.append((explained_variance(values, flat_returns), (values - flat_returns).abs().mean()))
        assert group.workers[0].weight_version == 24  # an optimizer step per mini-batch
    finally:
        group.shutdown()
    (ev0, err0), (ev, err) = history[0], history[-1]
    assert ev0 == 0.0 and ev > 0.5, history
    assert err < 0.2 * err0, history


def reference(model_dir, params: dict, samples: list[Sample], clip: float | None):
    """Independent: the HF model with the critic's weights, its final states before each
    response token, V = h . w + b, the clipped loss branch by branch, the token mean."""
    model = load_model(model_dir)
    model.load_state_dict({k.removeprefix("lm."): v for k, v in params.items() if k.startswith("lm.")})
    w = params["value_head.weight"].clone().requires_grad_()
    b = params["value_head.bias"].clone().requires_grad_()
    tokens = sum(s.num_tokens for s in samples)
    loss, branches = 0.0, []
    for s in samples:
        p = len(s.prompt_ids)
        hidden = model.model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).last_hidden_state
        v = hidden[0, p - 1 : -1] @ w[0] + b[0]
        r, old = s.extra["returns"], s.extra["old_values"]
        plain = (v - r) ** 2
        if clip is None:
            per_token = plain
        else:
            clipped = (torch.clamp(v, old - clip, old + clip) - r) ** 2
            per_token = torch.where(clipped > plain, clipped, plain)
            branches.append(torch.stack([clipped > plain, (v - old).abs() > clip]))
        loss = loss + 0.5 * per_token.sum() / tokens
    loss.backward()
    grads = {"lm." + n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    grads |= {"value_head.weight": w.grad.clone(), "value_head.bias": b.grad.clone()}
    return loss.item(), grads, torch.cat(branches, 1) if branches else None


def hand_picked_targets(samples: list[Sample], values: torch.Tensor) -> None:
    """Old values off the current ones by -0.6..0.6 (inside and outside eps = 0.2 of them),
    returns a unit normal off them: the clipped branch is the larger at some tokens and the
    smaller at others."""
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([-0.6, -0.3, -0.1, 0.0, 0.1, 0.3, 0.6])
    d = offsets[torch.randint(0, len(offsets), (len(values),), generator=g)]
    r = torch.randn(len(values), generator=g)
    set_targets(samples, per_sample(values + r, samples), per_sample(values + d, samples))


@pytest.mark.parametrize(
    "world, packing, clip", [(1, "padded", 0.2), (1, "packed", 0.2), (1, "padded", None), (2, "padded", 0.2)]
)
def test_loss_and_gradients_match_formula_for_every_split(model_dir, world, packing, clip, request):
    if world > 1:
        request.getfixturevalue("ray_cluster")
    samples = make_samples(seed=1)
    group = critic_group(model_dir, world, packing=packing, clip=clip)
    try:
        # a first step makes the head non-zero, so that the LM's gradients are not zero
        toward_one(samples)
        train(group, [samples])
        params = group.call("named_parameters")[0]
        assert params["value_head.weight"].abs().min() > 0
        hand_picked_targets(samples, values_of(group, samples))
        ref_loss, ref_grads, branches = reference(model_dir, params, samples, clip)
        if clip is not None:
            clip_larger, outside = branches
            assert clip_larger.any() and (outside & ~clip_larger).any()
        for split in SPLITS[packing]:
            (metrics,) = train(group, [samples], apply=False, **split)
            assert metrics["critic/value_loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
            if clip is not None:
                assert metrics["critic/clip_frac"] == pytest.approx(clip_larger.float().mean().item())
            assert_gradients_match(group, ref_grads, RTOL, ATOL)
    finally:
        group.shutdown()


def initial_output_head(model_dir) -> torch.Tensor:
    return load_model(model_dir).get_output_embeddings().weight.detach().clone()


def test_zero_stages_train_the_same_and_leave_the_output_head(model_dir):
    """Two steps with weight decay on: the same parameters under ZeRO 0, 1 and 2, and the
    untied output head (no gradient, frozen) exactly as loaded: left trainable, every stage
    would decay it (a zero gradient under ZeRO-0, a flat buffer under 1/2)."""
    samples = make_samples(seed=2)
    toward_one(samples)
    head = initial_output_head(model_dir)
    results = {}
    for stage in (0, 1, 2):
        group = critic_group(model_dir, zero_stage=stage, weight_decay=0.1)
        try:
            train(group, [samples, samples], max_seqs=3)
            results[stage] = group.call("named_parameters")[0]
            frozen = not group.workers[0].engine.module.lm.get_output_embeddings().weight.requires_grad
        finally:
            group.shutdown()
        assert torch.equal(results[stage]["lm.lm_head.weight"], head) and frozen
    for stage in (1, 2):
        assert set(results[stage]) == set(results[0])
        for name, value in results[0].items():
            torch.testing.assert_close(results[stage][name], value, rtol=RTOL, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tied_model_dir(model_dir, tmp_path_factory):
    """The small Llama with its output head tied to the input embeddings."""
    model = load_model(model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tied")
    model.save_pretrained(out)
    return out


def test_a_tied_output_head_trains_with_the_embeddings(tied_model_dir):
    samples = make_samples(seed=2)
    toward_one(samples)
    before = load_model(tied_model_dir).get_input_embeddings().weight.detach().clone()
    group = critic_group(tied_model_dir, zero_stage=1)
    try:
        lm = group.workers[0].engine.module.lm
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        assert lm.get_input_embeddings().weight.requires_grad
        train(group, [samples, samples], max_seqs=3)  # the 2nd step's head is non-zero
        after = group.call("named_parameters", "lm.model.embed_tokens")[0]["lm.model.embed_tokens.weight"]
    finally:
        group.shutdown()
    assert not torch.equal(after, before)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_checkpoint_restores_values_and_optimizer(model_dir, tmp_path, zero_stage):
    """A checkpoint mid-warm-up, loaded into a fresh critic: the same values, and the next step
    (Adam's moments, the LR schedule's place) gives the same parameters as without the stop."""
    samples = make_samples(seed=4)
    toward_one(samples)
    runs = []
    for resumed in (False, True):
        group = critic_group(model_dir, zero_stage=zero_stage, lr=1e-2, warmup=3)
        try:
            if resumed:
                group.call("load_checkpoint", str(tmp_path / "ckpt"), "step_2")
            else:
                train(group, [samples, samples])
                group.call("save_checkpoint", str(tmp_path / "ckpt"), "step_2")
                group.call("save_pretrained", str(tmp_path / "export"))
                head = torch.load(tmp_path / "export" / VALUE_HEAD_FILE)
                params = group.call("named_parameters", "value_head")[0]
                assert torch.equal(head["weight"], params["value_head.weight"])
                assert torch.equal(head["bias"], params["value_head.bias"])
            values = values_of(group, samples)
            (metrics,) = train(group, [samples])
            runs.append((values, metrics, group.call("named_parameters")[0]))
        finally:
            group.shutdown()
    (values_a, metrics_a, params_a), (values_b, metrics_b, params_b) = runs
    assert values_a.abs().min() > 0 and torch.equal(values_b, values_a)
    assert metrics_b == metrics_a and metrics_a["critic/lr"] == pytest.approx(1e-2)  # 3rd step: warm
    assert set(params_b) == set(params_a)
    for name, value in params_a.items():
        torch.testing.assert_close(params_b[name], value, rtol=0, atol=0, msg=name)
