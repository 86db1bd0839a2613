"""The policy losses of docs/algorithms.md section 6 on real learners do not depend on how a
mini-batch is cut.

The 8 sequences of `test_loss_normalisation` (2 groups of 4, old log-probs far enough from
the model's that the clips, caps, gates and masks fire), with per-token advantages (each
sequence's A plus noise, so that GSPO-token and GMPO's per-token rule are exercised), are
trained by GSPO-token, CISPO, GMPO, SAPO and the DPPO mask on a DeepSpeed learner (ZeRO-0)
in this process, split into 1, 2 and 4 micro-batches (padded) or by token budget (packed),
and GMPO (sequence-level) and CISPO also on 2 Ray ranks. Loss and gradients must equal an
independent computation from full logits, each formula written out per sequence below.
Tolerance: fp32, rtol 1e-5 / atol 1e-7.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import shard, view
from rlpost.jobs.update import train_minibatches
from rlpost.model.load import load_model
from rlpost.workers.learner import LRSchedule, start_learner_group
from tests.exactness.test_loss_normalisation import (
    assert_every_split_matches,
    make_samples,
)

RTOL, ATOL = 1e-5, 1e-7
PARAMS = {
    "gspo_token": {"clip_eps_low": 0.5, "clip_eps_high": 1.0},
    "cispo": {"clip_eps_high": 1.0},
    "gmpo": {"clip_eps": 0.4},
    "sapo": {},
    "dppo": {"delta_low": 0.05, "delta_high": 0.02},
    "clip_cov": {"pick_frac": 0.1, "cov_low": 0.05, "cov_high": 5.0},
    "kl_cov": {"top_frac": 0.1, "beta": 1.0},
}


def gspo_token(logp, old, a, p, sel=None):
    s = (logp - old).mean().exp()
    r = s.detach() * (logp - logp.detach()).exp()
    return torch.maximum(-a * r, -a * r.clamp(1 - p["clip_eps_low"], 1 + p["clip_eps_high"])).mean()


def cispo(logp, old, a, p, sel=None):
    return -((logp - old).exp().detach().clamp(max=1 + p["clip_eps_high"]) * a * logp).sum()


def gmpo(logp, old, a, p, sel=None):
    d, eps, a_bar = logp - old, p["clip_eps"], a.mean()
    clamped = d.clamp(-eps, eps)
    d_tilde = torch.minimum(d, clamped) if a_bar > 0 else torch.maximum(d, clamped) if a_bar < 0 else d
    return (-a * d_tilde.mean().exp()).mean()


def sapo(logp, old, a, p, sel=None):
    tau = torch.where(a > 0, 1.0, 1.05)
    return (-torch.sigmoid(tau * ((logp - old).exp() - 1)) * 4 / tau * a).sum()


def dppo(logp, old, a, p, sel=None):
    r = (logp - old).exp()
    rise = logp.detach().exp() - old.exp()
    masked = ((a > 0) & (rise > p["delta_high"])) | ((a < 0) & (rise < -p["delta_low"]))
    return (-a * torch.where(masked, r.detach(), r)).sum()


def clip_cov(logp, old, a, p, sel):
    """sel: the picked tokens, which weigh 0 (and stay in the token count)."""
    return (-a * (logp - old).exp() * ~sel).sum()


def kl_cov(logp, old, a, p, sel):
    """sel: the top tokens by covariance."""
    log_r = logp - old
    return (-a * log_r.exp() + p["beta"] * log_r.abs() * sel).sum()


def covariance(samples) -> torch.Tensor:
    """(log pi_old - its mean)(A - its mean) over every token of the mini-batch."""
    old = torch.cat([s.old_logp for s in samples]).double()
    adv = torch.cat([s.advantages for s in samples]).double()
    return (old - old.mean()) * (adv - adv.mean())


def selection(name: str, samples) -> list[torch.Tensor | None]:
    """Per sequence, the tokens Clip-Cov picked (read from the weights: the pick is random, so
    only its size and its candidates are checked here) or KL-Cov's top ones (recomputed)."""
    cov, p, n = covariance(samples), PARAMS.get(name, {}), sum(s.num_tokens for s in samples)
    sizes = [s.num_tokens for s in samples]
    if name == "clip_cov":
        picked = torch.cat([s.weights == 0 for s in samples])
        assert picked.sum() == math.floor(p["pick_frac"] * n + 0.5) > 0
        assert ((cov[picked] > p["cov_low"]) & (cov[picked] < p["cov_high"])).all()
        return list(picked.split(sizes))
    if name == "kl_cov":
        top = torch.zeros(n, dtype=torch.bool)
        top[cov.argsort(descending=True)[: math.floor(p["top_frac"] * n + 0.5)]] = True
        return list(top.split(sizes))
    return [None] * len(samples)


# per-sequence terms; the sequence-level losses are averaged over sequences, the token-level
# ones (sums over a sequence's tokens) divided by the mini-batch's token count
FORMULAS = {
    "gspo_token": gspo_token,
    "cispo": cispo,
    "gmpo": gmpo,
    "sapo": sapo,
    "dppo": dppo,
    "clip_cov": clip_cov,
    "kl_cov": kl_cov,
}
SEQUENCE_MEAN = {"gspo_token", "gmpo"}


def samples_for(name: str):
    samples = make_samples(seed=2)
    g = torch.Generator().manual_seed(5)
    for s in samples:
        s.advantages = s.advantages + 0.5 * torch.randn(s.num_tokens, generator=g)
    algo, batch, sizes = build_algorithm(name, PARAMS[name]), view(samples), [s.num_tokens for s in samples]
    inputs = {k: v.split(sizes) for k, v in algo.minibatch_inputs(batch).items()}
    for i, (s, w) in enumerate(zip(samples, algo.token_weights(batch).split(sizes))):
        s.weights = w
        s.extra.update({k: v[i] for k, v in inputs.items()})
    return samples


def reference(model_dir, name: str, samples):
    model = load_model(model_dir)
    terms = []
    for s, sel in zip(samples, selection(name, samples)):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        n = len(s.prompt_ids)
        logp = model(input_ids=ids).logits[0, n - 1 : -1].float().log_softmax(-1)
        logp = logp.gather(-1, ids[0, n:, None]).squeeze(-1)
        terms.append(FORMULAS[name](logp, s.old_logp, s.advantages, PARAMS[name], sel))
    tokens = sum(s.num_tokens for s in samples)
    loss = torch.stack(terms).mean() if name in SEQUENCE_MEAN else torch.stack(terms).sum() / tokens
    loss.backward()
    grads = {"lm." + k: v.grad.clone() for k, v in model.named_parameters()}
    assert any(g.abs().max() > 0 for g in grads.values())
    return loss.item(), grads


def learner_group(model_dir, name: str, world: int, packing: str):
    cfg = TrainConfig(mode="ray" if world > 1 else "inprocess")
    cfg.learner.packing = packing
    cfg.learner.num_learners = world
    cfg.learner.zero_stage = 0
    cfg.learner.grad_clip = 0.0
    return start_learner_group(
        cfg, model_dir, (name, PARAMS[name]), LRSchedule(1e-3), pad_id=0, use_ray=world > 1
    )


CASES = [(name, 1, packing) for name in FORMULAS for packing in ("padded", "packed")]
CASES += [("gmpo", 2, "padded"), ("cispo", 2, "packed"), ("kl_cov", 2, "padded")]


@pytest.mark.parametrize("name, world, packing", CASES)
def test_loss_and_gradients_match_formula_for_every_split(model_dir, name, world, packing, request):
    if world > 1:
        request.getfixturevalue("ray_cluster")
    samples = samples_for(name)
    ref_loss, ref_grads = reference(model_dir, name, samples)
    assert_every_split_matches(
        learner_group(model_dir, name, world, packing), samples, packing, ref_loss, ref_grads
    )


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_the_update_path_carries_the_minibatch_selection(model_dir, name):
    """`jobs.update.train_minibatches` (the runtime's path: weights and `minibatch_inputs` over
    the whole mini-batch, then the cut) reports the formula's loss for a mini-batch cut into
    micro-batches of two sequences."""
    samples = samples_for(name)
    ref_loss, _ = reference(model_dir, name, samples)
    for s in samples:  # the runtime sets them itself
        s.weights = None
        s.extra.clear()
    group = learner_group(model_dir, name, world=1, packing="padded")
    try:
        split = lambda mb: shard(mb, 1, max_seqs=2, packed=False)  # noqa: E731
        (metrics,) = train_minibatches(group, build_algorithm(name, PARAMS[name]), [samples], split)
    finally:
        group.shutdown()
    result = metrics.result()
    assert result["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
    if name == "clip_cov":
        assert result["cov/picked_frac"] == pytest.approx(3 / 32)  # round(0.1 x 32 tokens)
    else:
        assert result["cov/selected_frac"] == pytest.approx(3 / 32)  # round(0.1 x 32 tokens)
