"""Credit beyond the outcome on real learners does not depend on how a mini-batch is cut
(docs/algorithms.md section 5).

- The policy's loss under per-token advantages (every section-5 method: PPO's clipped
  surrogate on each token's own A_t, token-mean), on the 8 sequences of
  `test_loss_normalisation` with per-token advantages.
- PRIME's implicit-PRM loss: the mean over responses of BCE(sigmoid(beta sum_t log(pi_phi /
  pi_ref)), label), a nonlinearity of whole-sequence sums.
Each is trained on a DeepSpeed learner (ZeRO-0) split into 1, 2 and 4 micro-batches (padded)
or by token budget (packed), and on 2 Ray ranks; loss and gradients must equal an
independent computation from full logits. Tolerance: fp32, rtol 1e-5 / atol 1e-7.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.prime import IMPLICIT_PRM_LOSS, OUTCOME_LABEL
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import view
from rlpost.model.load import load_model
from rlpost.workers.learner import ImplicitPRM, LRSchedule, start_learner_group
from tests.exactness.test_loss_normalisation import assert_every_split_matches, make_samples, surrogate_sums

BETA = 0.5


def group_of(model_dir, algorithm: tuple[str, dict], world: int, packing: str, role=None):
    cfg = TrainConfig(mode="ray" if world > 1 else "inprocess")
    cfg.learner.packing = packing
    cfg.learner.num_learners = world
    cfg.learner.zero_stage = 0
    cfg.learner.grad_clip = 0.0
    kwargs = {"role": role} if role is not None else {}
    return start_learner_group(
        cfg, model_dir, algorithm, LRSchedule(1e-3), pad_id=0, use_ray=world > 1, **kwargs
    )


def with_weights(samples, algorithm):
    for s, w in zip(samples, algorithm.token_weights(view(samples)).split([s.num_tokens for s in samples])):
        s.weights = w
    return samples


def token_advantage_samples():
    samples = make_samples(seed=3)
    g = torch.Generator().manual_seed(11)
    for s in samples:
        s.advantages = s.advantages + torch.randn(s.num_tokens, generator=g)
    return with_weights(samples, build_algorithm("ppo", {}))


def sequence_logp(model, s) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    n = len(s.prompt_ids)
    logp = model(input_ids=ids).logits[0, n - 1 : -1].float().log_softmax(-1)
    return logp.gather(-1, ids[0, n:, None]).squeeze(-1)


def gradients(model, loss):
    loss.backward()
    return loss.item(), {"lm." + k: v.grad.clone() for k, v in model.named_parameters()}


def prm_samples():
    samples = make_samples(seed=4)
    g = torch.Generator().manual_seed(7)
    for i, s in enumerate(samples):
        s.ref_logp = s.old_logp + 0.3 * torch.randn(s.num_tokens, generator=g)
        s.extra[OUTCOME_LABEL] = torch.full((s.num_tokens,), float(i % 3 == 0))
    return with_weights(samples, build_algorithm(IMPLICIT_PRM_LOSS, {"beta": BETA}))


def prm_reference(model_dir, samples):
    model = load_model(model_dir)
    terms = []
    for s in samples:
        z = BETA * (sequence_logp(model, s) - s.ref_logp).sum()
        terms.append(F.binary_cross_entropy_with_logits(z, s.extra[OUTCOME_LABEL][0]))
    return gradients(model, torch.stack(terms).mean())


CASES = [(1, "padded"), (1, "packed"), (2, "padded")]


@pytest.mark.parametrize("world, packing", CASES)
def test_per_token_advantages_match_formula_for_every_split(model_dir, world, packing, request):
    if world > 1:
        request.getfixturevalue("ray_cluster")
    samples = token_advantage_samples()
    model = load_model(model_dir)
    ref_loss, ref_grads = gradients(model, torch.stack(surrogate_sums(model, samples)).sum() / 32)
    assert sum(s.num_tokens for s in samples) == 32
    assert_every_split_matches(
        group_of(model_dir, ("ppo", {}), world, packing), samples, packing, ref_loss, ref_grads
    )


@pytest.mark.parametrize("world, packing", CASES)
def test_implicit_prm_loss_matches_formula_for_every_split(model_dir, world, packing, request):
    if world > 1:
        request.getfixturevalue("ray_cluster")
    samples = prm_samples()
    ref_loss, ref_grads = prm_reference(model_dir, samples)
    group = group_of(model_dir, (IMPLICIT_PRM_LOSS, {"beta": BETA}), world, packing, role=ImplicitPRM)
    assert_every_split_matches(group, samples, packing, ref_loss, ref_grads)
