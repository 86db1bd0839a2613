"""Token masks (selection, truncated responses) enter the aggregation weights: masked
tokens weigh 0 and leave every normaliser, and the loss stays exact under any
micro-batch split. Also the entropy bonus.

The learner test trains one mini-batch of 8 sequences (2 groups) with a token mask
and the entropy bonus on a DeepSpeed learner (ZeRO-0, in this process), cut into 1,
2 and 4 micro-batches and in shuffled micro-batch order, and compares loss and
gradients with an independent computation from full logits:
l = max(-A rho, -A clip(rho, 0.8, 1.2)) - 0.05 H per token, aggregated over the
kept tokens. Tolerance: fp32, rtol 1e-5 / atol 1e-7.
"""

from __future__ import annotations

import pytest
import torch

from rlpost.algorithms import TokenTensors, build_algorithm
from rlpost.algorithms.aggregation import AGGREGATIONS, aggregate
from rlpost.algorithms.base import TOKEN_MASK
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import Sample, view
from rlpost.model.load import load_model
from rlpost.workers.learner import LRSchedule, start_learner_group
from tests.run_helpers import assert_gradients_match

F64 = torch.float64
RTOL, ATOL = 1e-5, 1e-7
ENTROPY_COEF = 0.05


def _samples(spec) -> list[Sample]:
    """spec: (group, advantage, mask bits) per sequence."""
    return [
        Sample(
            prompt_ids=[1],
            response_ids=[3] * len(bits),
            group=g,
            advantages=torch.full((len(bits),), a),
            extra={TOKEN_MASK: torch.tensor(bits, dtype=torch.bool)},
        )
        for g, a, bits in spec
    ]


# seq 1 loses all its tokens, so it leaves the sequence counts and group 0's G
SPEC = [
    (0, 1.0, [1, 0, 1]),
    (0, -1.0, [0, 0]),
    (0, -0.5, [1, 1, 1, 1]),
    (1, 2.0, [1, 1]),
    (1, -2.0, [0, 1, 0]),
]


def _per_token(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_view_carries_the_mask():
    b = view(_samples(SPEC))
    assert b.token_mask.tolist() == [True, False, True, False, False] + [True] * 6 + [False, True, False]
    assert view([Sample(prompt_ids=[1], response_ids=[3])]).token_mask is None


@pytest.mark.parametrize(
    "name, expected",
    [
        # 9 kept tokens
        ("token-mean", [1 / 9, 0, 1 / 9, 0, 0] + [1 / 9] * 6 + [0, 1 / 9, 0]),
        # S = 4 sequences; 1/(S * kept tokens of the sequence): 1/8, 1/16, 1/8, 1/4
        ("seq-mean-token-mean", [1 / 8, 0, 1 / 8, 0, 0] + [1 / 16] * 4 + [1 / 8] * 2 + [0, 1 / 4, 0]),
        ("seq-mean-token-sum", [1 / 4, 0, 1 / 4, 0, 0] + [1 / 4] * 6 + [0, 1 / 4, 0]),
        ("constant", [1 / 20, 0, 1 / 20, 0, 0] + [1 / 20] * 6 + [0, 1 / 20, 0]),
        # group 0: G = 2 (seq 1 is gone), k = n- = 1, N+ = 2, N- = 4 -> (1/2)/2, (1/2)/4;
        # group 1: G = 2, N+ = 2, N- = 1 -> (1/2)/2, (1/2)/1; two groups -> halve everything
        ("balanced", [1 / 8, 0, 1 / 8, 0, 0] + [1 / 16] * 4 + [1 / 8] * 2 + [0, 1 / 4, 0]),
    ],
)
def test_masked_aggregation_numbers(name, expected):
    torch.testing.assert_close(aggregate(name, view(_samples(SPEC)), 20.0), _per_token(expected))


def test_a_fully_masked_group_leaves_the_group_count():
    spec = [(0, 1.0, [1, 1]), (0, -1.0, [1, 1]), (1, 1.0, [0, 0]), (1, -1.0, [0])]
    # one group left: (1/2)/2 per token on each side, not divided by 2 groups
    torch.testing.assert_close(
        aggregate("balanced", view(_samples(spec))), _per_token([0.25] * 4 + [0.0] * 3)
    )


def test_all_ones_mask_and_no_mask_agree():
    spec = [(g, a, [1] * n) for g, a, n in [(0, 1.0, 2), (0, -1.0, 5), (1, 0.5, 3), (1, 0.0, 1)]]
    masked = view(_samples(spec))
    plain = view(
        [
            Sample(
                prompt_ids=[1], response_ids=[3] * len(bits), group=g, advantages=torch.full((len(bits),), a)
            )
            for g, a, bits in spec
        ]
    )
    for name in AGGREGATIONS:
        torch.testing.assert_close(aggregate(name, masked, 7.0), aggregate(name, plain, 7.0))


@pytest.mark.parametrize("seed", range(3))
def test_masked_aggregation_is_the_aggregation_of_the_kept_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    spec = []
    for group in range(4):
        for _ in range(int(torch.randint(2, 5, (), generator=g))):
            n = int(torch.randint(1, 7, (), generator=g))
            a = float(torch.randint(-1, 2, (), generator=g))
            spec.append((group, a, (torch.rand(n, generator=g) < 0.6).int().tolist()))
    samples = _samples(spec)
    # the same batch with the masked tokens deleted and the emptied sequences dropped
    deleted = [
        Sample(
            prompt_ids=[1], response_ids=[3] * sum(bits), group=grp, advantages=torch.full((sum(bits),), a)
        )
        for grp, a, bits in spec
        if sum(bits)
    ]
    kept = view(samples).token_mask
    assert 0 < kept.sum() < kept.numel()
    for name, fn in AGGREGATIONS.items():
        w = aggregate(name, view(samples), 30.0)
        assert (w[~kept] == 0).all()
        torch.testing.assert_close(w[kept], fn(view(deleted), 30.0))


# ----------------------------------------------------------------------------- entropy bonus


def test_entropy_bonus_numbers_and_gradient():
    algo = build_algorithm("grpo", {"entropy_coef": 0.01})
    assert algo.needs.entropy_grad and not algo.needs.reference
    entropy = torch.tensor([0.5, 2.0], requires_grad=True)
    t = TokenTensors(
        logp=torch.zeros(2),
        old_logp=torch.zeros(2),
        advantages=torch.tensor([1.0, -2.0]),
        entropy=entropy,
        ref_logp=None,
        seq_index=torch.zeros(2, dtype=torch.long),
    )
    loss, _ = algo.token_loss(t)
    # ratio 1: -A - 0.01 H = -1 - 0.005, 2 - 0.02
    torch.testing.assert_close(loss, torch.tensor([-1.005, 1.98]))
    loss.sum().backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([-0.01, -0.01]))
    assert not build_algorithm("grpo", {}).needs.entropy_grad
    assert build_algorithm("hapo", {"entropy_coef": 0.01}).needs.entropy_grad


# ----------------------------------------------------------------------------- on a learner


def make_samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    lengths = [(4, 1), (6, 5), (3, 9), (5, 2), (7, 3), (4, 7), (6, 1), (3, 4)]
    masks = [
        [1],
        [0, 1, 1, 0, 1],
        [1, 1, 0, 0, 1, 1, 1, 0, 1],
        [0, 0],
        [1, 0, 1],
        [0, 1, 1, 1, 0, 0, 1],
        [1],
        [1, 0, 0, 1],
    ]
    samples = []
    for i, ((p_len, r_len), bits) in enumerate(zip(lengths, masks)):
        ids = torch.randint(3, 15, (p_len + r_len,), generator=g).tolist()
        adv = torch.randn((), generator=g).item()
        samples.append(
            Sample(
                prompt_ids=[1] + ids[:p_len],
                response_ids=ids[p_len:],
                group=i // 4,
                advantages=torch.full((r_len,), adv),
                old_logp=torch.log(torch.rand(r_len, generator=g) * 0.2 + 0.02),
                extra={TOKEN_MASK: torch.tensor(bits, dtype=torch.bool)},
            )
        )
    return samples


def reference(model_dir, samples, loss_agg: str):
    """Full logits; the clipped surrogate minus the entropy bonus; aggregated over the kept
    tokens, with sequences that keep no token left out."""
    model = load_model(model_dir)
    sums, counts, advs, groups = [], [], [], []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logits = model(input_ids=ids).logits[0].float()
        p = len(s.prompt_ids)
        logq = logits[p - 1 : -1].log_softmax(-1)
        logp = logq.gather(-1, ids[0, p:, None]).squeeze(-1)
        entropy = -(logq.exp() * logq).sum(-1)
        ratio = torch.exp(logp - s.old_logp)
        a = s.advantages
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)) - ENTROPY_COEF * entropy
        keep = s.extra[TOKEN_MASK]
        if keep.any():
            sums.append(loss[keep].sum())
            counts.append(int(keep.sum()))
            advs.append(a[0].item())
            groups.append(s.group)
    if loss_agg == "token-mean":
        total = torch.stack(sums).sum() / sum(counts)
    elif loss_agg == "seq-mean-token-mean":
        total = torch.stack([x / n for x, n in zip(sums, counts)]).mean()
    else:  # balanced
        per_group = []
        for grp in sorted(set(groups)):
            idx = [i for i, x in enumerate(groups) if x == grp]
            side = [[i for i in idx if advs[i] > 0], [i for i in idx if advs[i] < 0]]
            per_group.append(
                sum(
                    len(ids) / len(idx) * sum(sums[i] for i in ids) / sum(counts[i] for i in ids)
                    for ids in side
                    if ids
                )
            )
        total = torch.stack(per_group).mean()
    total.backward()
    return total.item(), {"lm." + n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def learner(model_dir):
    cfg = TrainConfig(mode="inprocess")
    cfg.learner.zero_stage = 0
    cfg.learner.grad_clip = 0.0
    group = start_learner_group(
        cfg, model_dir, ("grpo", {"entropy_coef": ENTROPY_COEF}), LRSchedule(1e-3), pad_id=0, use_ray=False
    )
    yield group
    group.shutdown()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "balanced"])
def test_masked_loss_and_gradients_match_formula_for_every_split(model_dir, learner, loss_agg):
    samples = make_samples()
    algo = build_algorithm("grpo", {"loss_agg": loss_agg, "entropy_coef": ENTROPY_COEF})
    for s, w in zip(samples, algo.token_weights(view(samples)).split([s.num_tokens for s in samples])):
        s.weights = w
    ref_loss, ref_grads = reference(model_dir, samples, loss_agg)
    splits = [
        [samples],
        [samples[:4], samples[4:]],
        [samples[i : i + 2] for i in range(0, 8, 2)],
        [samples[6:], samples[1:3], [samples[0], samples[5]], samples[3:5]],
    ]
    for micro_batches in splits:
        metrics = learner.call("train_minibatch", micro_batches, False)[0].result()
        assert metrics["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
        assert_gradients_match(learner, ref_grads, RTOL, ATOL)
