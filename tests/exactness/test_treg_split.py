"""T-REG does not depend on how a mini-batch is cut, and its token rewards are the reference's.

1. Tensors: the tokens of six pairs cut into 1, 2 or 4 micro-batches, whole pairs per
   micro-batch (the loss summed per micro-batch over its pairs) or shuffled so that pairs
   are split across micro-batches and two "ranks" (the two-pass path: `loss_coefficients`
   at the all-reduced sums, then each micro-batch's `surrogate`): loss and gradient equal
   the whole batch's.
2. The learner (tests/exactness/test_offline_exactness.py's harness): `rlpost.jobs.treg`
   computes r_t with the learners' reference under two revised prompts, in chunks of pairs
   and micro-batches, equal to r_t from full logits one sequence at a time; then, after a
   step that moves the policy away from the reference, `PairLearner.train_pairs` with those
   r_t gives the loss, gradients (ZeRO-0) and metrics of the formula, written out with full
   logits, for 1, 2 and 6 pairs per micro-batch (padded) and under token budgets (packed).
"""

from __future__ import annotations

import operator
from functools import reduce
from types import SimpleNamespace

import pytest
import torch
from torch.nn.functional import logsigmoid

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.pairs import loss_coefficients, pair_sums, surrogate
from rlpost.algorithms.preference import PreferenceConfig, preference_loss, preference_metrics
from rlpost.config.offline import DPOJobConfig
from rlpost.config.sections import ModelConfig
from rlpost.data.pairs import pair_samples, shard_pairs
from rlpost.jobs import treg
from rlpost.model.load import char_tokenizer, load_model, materialise_initial_model
from tests.exactness.test_offline_exactness import SPLITS, full_tokens, learner_group, make_pairs
from tests.run_helpers import assert_gradients_match

RTOL, ATOL = 1e-5, 1e-7
BETA, ALPHA = 0.5, 0.5
ALPHABET = "0123456789+=abcdef"  # ids 3..20, as make_pairs draws them


# ----- 1. tensors ----------------------------------------------------------------------------


def random_batch(num_pairs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (num_pairs, 2), generator=g)
    pair = torch.cat([torch.full((int(lengths[p, s]),), p) for p in range(num_pairs) for s in (0, 1)])
    chosen = torch.cat([torch.full((int(lengths[p, s]),), s == 0) for p in range(num_pairs) for s in (0, 1)])
    n = pair.numel()
    logp = (-torch.rand(n, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    r = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return pair, chosen, logp, ref, r


def sums_of(idx, pair, chosen, logp, ref, r, num_pairs):
    return pair_sums(logp[idx], ref[idx], pair[idx], chosen[idx], num_pairs, token_reward=r[idx])


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_split_loss_and_gradient_equal_the_whole(parts):
    num_pairs, cfg = 6, PreferenceConfig(loss="treg", beta=BETA, treg_alpha=ALPHA)
    batch = random_batch(num_pairs, seed=parts)
    pair, logp = batch[0], batch[2]
    loss_fn = lambda s: preference_loss(s, cfg).mean()  # noqa: E731
    whole = loss_fn(sums_of(torch.arange(pair.numel()), *batch, num_pairs))
    (want,) = torch.autograd.grad(whole, logp)

    # pair-atomic micro-batches: each sums its own pairs' losses over the mini-batch's pairs
    atomic = [
        torch.nonzero(torch.isin(pair, ps)).squeeze(1) for ps in torch.arange(num_pairs).tensor_split(parts)
    ]
    losses = [
        preference_loss(sums_of(i, *batch, num_pairs), cfg)[pair[i].unique()].sum() / num_pairs
        for i in atomic
    ]
    torch.testing.assert_close(sum(losses), whole, rtol=1e-12, atol=0)
    (got,) = torch.autograd.grad(sum(losses), logp)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)

    # pairs split across micro-batches and two ranks: the two-pass path
    order = torch.randperm(pair.numel(), generator=torch.Generator().manual_seed(parts))
    micro = list(order.tensor_split(parts))
    ranks = [micro[0::2], micro[1::2]]
    with torch.no_grad():
        per_rank = [
            reduce(operator.add, (sums_of(i, *batch, num_pairs) for i in mbs)) for mbs in ranks if mbs
        ]
        total = reduce(operator.add, per_rank)
    torch.testing.assert_close(loss_fn(total), whole.detach(), rtol=1e-12, atol=0)
    coef = loss_coefficients(loss_fn, total)
    assert coef.reg.abs().min() > 0 and not coef.token_reward.any()  # r_t is a constant of the data
    for mbs in ranks:
        for i in mbs:
            surrogate(sums_of(i, *batch, num_pairs), coef).backward()
    torch.testing.assert_close(logp.grad, want, rtol=1e-10, atol=1e-14)


# ----- 2. the learner ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The harness's model with its output head scaled up, so that the prompt moves the
    next-token distribution enough for r_t to be far from 0."""
    d = materialise_initial_model(
        ModelConfig(hidden_size=64, intermediate_size=128),
        ALPHABET,
        seed=0,
        out_dir=tmp_path_factory.mktemp("model"),
        max_len=64,
    )
    model = load_model(d)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(d)
    return d


def with_revisions(seed: int = 2):
    """make_pairs' pairs, each prompt revised two ways: words before and after it."""
    pairs = make_pairs(seed)
    for i, p in enumerate(pairs):
        body = p.prompt_ids[1:]
        p.revised_prompt_ids = [[1, 13, 14, 15] + body + [12, 3 + i], [1, 16, 17] + body + [11]]
    return pairs


def rewards_by_formula(ref, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """r_t = sigmoid(log pi_ref(y_t | x_better) - log pi_ref(y_t | x_worse)) - 0.5 from full
    logits, one sequence at a time, in float64."""
    out = []
    for p in pairs:
        sides = []
        for ids in (p.chosen_ids, p.rejected_ids):
            better, worse = (
                full_tokens(ref, ref, x, ids, masks=False)[1].double() for x in p.revised_prompt_ids
            )
            sides.append(torch.sigmoid(better - worse) - 0.5)
        out.append(tuple(sides))
    return out


def formula(policy_dir, weights, ref_dir, pairs):
    """Mean T-REG loss over the pairs, gradients and metrics, from the formulas."""
    policy, ref = load_model(policy_dir), load_model(ref_dir)
    policy.load_state_dict(weights)
    losses, margins, rewards, ws, regs = [], [], [], [], []
    for p in pairs:
        lw, rw, _, _ = full_tokens(policy, ref, p.prompt_ids, p.chosen_ids, False)
        ll, rl, _, _ = full_tokens(policy, ref, p.prompt_ids, p.rejected_ids, False)
        r_w, r_l = (torch.tensor(r, dtype=torch.float64) for r in p.token_rewards)
        delta_w, delta_l = (lw - rw).sum(), (ll - rl).sum()
        w = torch.sigmoid(BETA * (delta_l - delta_w)).detach()
        reg = -ALPHA * w * BETA * ((r_w * lw).sum() + (r_l * ll).sum())
        losses.append(-logsigmoid(BETA * (delta_w - delta_l)) + reg)
        margins.append(BETA * (delta_w - delta_l).item())
        ws.append(w.item())
        regs.append(reg.item())
        rewards.append((r_w, r_l))
    total = torch.stack(losses).mean()
    total.backward()
    metrics = {
        "rewards/margin": sum(margins) / len(pairs),
        "treg/token_reward_chosen": torch.cat([r[0] for r in rewards]).mean().item(),
        "treg/token_reward_rejected": torch.cat([r[1] for r in rewards]).mean().item(),
        "treg/weight": sum(ws) / len(pairs),
        "treg/reg_loss": sum(regs) / len(pairs),
    }
    return total.item(), {"lm." + n: q.grad.clone() for n, q in policy.named_parameters()}, metrics


def train(group, pairs, apply: bool, packed: bool, **split):
    parts = shard_pairs(pair_samples(pairs, token_rewards=True), len(group), packed=packed, **split)
    results = group.call("train_pairs", per_rank=[(p, len(pairs), apply) for p in parts])
    sums = [s for _, s in results if s is not None]
    return sum(m.result()["loss"] for m, _ in results), sum(sums[1:], sums[0])


@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_learner_token_rewards_and_every_split_match_the_formula(model_dir, tmp_path, monkeypatch, packing):
    budget = {"micro_batch_size": 3} if packing == "padded" else {"micro_batch_tokens": 30}
    cfg = DPOJobConfig(
        data={"path": "unused.jsonl"},
        algorithm={"loss": "treg", "beta": BETA, "treg_alpha": ALPHA},
        learner=budget,
    )
    pairs = with_revisions()
    group = learner_group(model_dir, cfg, 1, packing, lr=1e-2)
    try:
        monkeypatch.setattr(treg, "PAIRS_PER_CALL", 4)  # 6 pairs: two calls
        lines = []
        trainer = SimpleNamespace(
            algorithm=build_algorithm(*cfg.algorithm_spec()),
            cfg=cfg,
            packed=group.call("is_packed")[0],
            learners=group,
            train_rows=pairs[:4],
            eval_rows=pairs[4:],
            tracker=SimpleNamespace(print_line=lines.append),
            tokenizer=char_tokenizer(ALPHABET),
            run_dir=tmp_path,
        )
        treg.attach_token_rewards(trainer)
        want = rewards_by_formula(load_model(model_dir), pairs)
        for p, (r_w, r_l) in zip(pairs, want):
            torch.testing.assert_close(
                torch.tensor(p.token_rewards[0], dtype=torch.float64), r_w, rtol=0, atol=2e-6
            )
            torch.testing.assert_close(
                torch.tensor(p.token_rewards[1], dtype=torch.float64), r_l, rtol=0, atol=2e-6
            )
        assert max(r.abs().max().item() for side in want for r in side) > 0.05  # far from 0
        assert lines[0].startswith("treg: token rewards of 6 pairs (54 tokens) in ")
        assert (tmp_path / "token_rewards.html").is_file() and (tmp_path / "token_rewards.png").is_file()

        train(group, pairs[:3], apply=True, packed=packing == "packed")  # the policy moves away
        group.call("zero_grad")
        ref_loss, ref_grads, ref_metrics = formula(
            model_dir, group.call("export_weights")[0], model_dir, pairs
        )
        assert abs(ref_metrics["rewards/margin"]) > 1e-3 and abs(ref_metrics["treg/reg_loss"]) > 1e-3
        # fp32 sums of terms up to the largest gradient: their rounding scales with it (the
        # scaled head makes it ~1.7 here, ~10x the harness's)
        grad_atol = ATOL * 10 * max(g.abs().max().item() for g in ref_grads.values())
        for split in SPLITS[packing]:
            loss, sums = train(group, pairs, apply=False, packed=packing == "packed", **split)
            assert loss == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), split
            assert_gradients_match(group, ref_grads, RTOL, grad_atol)
            metrics = preference_metrics(sums, cfg.algorithm)
            for name, value in ref_metrics.items():
                assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, name)
    finally:
        group.shutdown()
