"""ssToken (docs/algorithms.md section 8): REL', the score and the per-sample selection by hand,
ceil(rho |y|), rho = 1 as plain NLL, split invariance of the loss, the EMA history model's
numbers, and the prompt attention against the model's full attention matrix."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlpost.algorithms import TokenTensors, build_algorithm
from rlpost.algorithms.base import HISTORY_LOGP, PROMPT_ATTENTION
from rlpost.algorithms.sstoken import selected_counts
from rlpost.data.batch import Sample, collate, view
from rlpost.errors import ConfigError
from rlpost.model.attention import packed_kwargs
from rlpost.model.ema import EMAPolicy
from rlpost.model.policy import PolicyModel
from rlpost.model.prompt_attention import PromptAttention
from tests.algorithms.split_check import SPLITS, assert_split_invariant, make_batch

f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731

# Three samples, numbers exact in binary. A: REL = logp - hist = [0.5, -1, 0, 1] -> REL' =
# [0.75, 0, 0.5, 1]. B: REL all 0 -> REL' 0. C: one token, REL' 0.
LOGP = [-1.0, -2.0, -0.5, -3.0] + [-0.25, -0.5, -1.0] + [-2.0]
HIST = [-1.5, -1.0, -0.5, -4.0] + [-0.25, -0.5, -1.0] + [-1.0]
ATTN = [0.25, 0.75, 0.25, 0.125] + [0.5, 0.125, 0.75] + [0.5]
SEQ = [0, 0, 0, 0, 1, 1, 1, 2]
REL = [0.5, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
REL_NORM = [0.75, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0]


def hand_tokens(logp=LOGP) -> TokenTensors:
    logp = logp if isinstance(logp, torch.Tensor) else f64(logp)
    return TokenTensors(
        logp=logp,
        old_logp=None,
        advantages=None,
        entropy=None,
        ref_logp=None,
        seq_index=torch.tensor(SEQ),
        extra={HISTORY_LOGP: f64(HIST), PROMPT_ATTENTION: f64(ATTN)},
    )


def sstoken(**params):
    return build_algorithm("sstoken", params)


@pytest.mark.parametrize(
    "gamma, selected",
    [
        # score [0.5, 0.375, 0.375, 0.5625 | 0.25, 0.0625, 0.375 | 0.25]; k = 3, 2, 1; the tie
        # between A's tokens 1 and 2 goes to the earlier one
        (0.5, [1, 1, 0, 1, 1, 0, 1, 1]),
        (1.0, [1, 0, 1, 1, 1, 1, 0, 1]),  # REL' alone: B's all-zero REL' ties, earliest first
        (0.0, [1, 1, 1, 0, 1, 0, 1, 1]),  # Attn alone: A's 0.25 tie at tokens 0 and 2, both kept
    ],
)
def test_scores_and_selection_by_hand(gamma, selected):
    algo = sstoken(gamma=gamma)
    t = hand_tokens()
    scores = algo.scores(t)
    want_score = [gamma * r + (1 - gamma) * a for r, a in zip(REL_NORM, ATTN)]
    torch.testing.assert_close(scores["score"], f64(want_score), rtol=0, atol=0)
    if gamma > 0:
        torch.testing.assert_close(scores["rel"], f64(REL), rtol=0, atol=0)
        torch.testing.assert_close(scores["rel_norm"], f64(REL_NORM), rtol=0, atol=0)
    loss, metrics = algo.token_loss(t)
    mask = f64(selected)
    torch.testing.assert_close(loss, -f64(LOGP) * mask, rtol=0, atol=0)
    torch.testing.assert_close(metrics["sstoken/selected_frac"], mask)
    torch.testing.assert_close(metrics["nll"], -f64(LOGP))
    torch.testing.assert_close(metrics["nll_selected"], -f64(LOGP)[mask.bool()])
    assert ("sstoken/rel_mean" in metrics) == (gamma > 0)
    assert ("sstoken/attn_mean" in metrics) == (gamma < 1)


def test_the_loss_is_the_mean_over_every_selected_token_of_the_minibatch():
    algo = sstoken()
    samples = [Sample(prompt_ids=[1], response_ids=[3] * n) for n in (4, 3, 1)]
    weights = algo.token_weights(view(samples))
    torch.testing.assert_close(weights, torch.full((8,), 1 / 6, dtype=torch.float64))  # k = 3 + 2 + 1
    loss, _ = algo.token_loss(hand_tokens())
    want = (1.0 + 2.0 + 3.0 + 0.25 + 1.0 + 2.0) / 6  # -log p of the selected tokens
    assert (weights * loss).sum().item() == pytest.approx(want, rel=1e-15)


def test_selected_counts_are_ceil_rho_times_length_per_sample():
    lengths = torch.tensor([1, 2, 3, 4, 5, 10, 0])
    assert selected_counts(lengths, 0.6).tolist() == [1, 2, 2, 3, 3, 6, 0]
    assert selected_counts(lengths, 1.0).tolist() == [1, 2, 3, 4, 5, 10, 0]
    # 0.14 x 50 and 0.28 x 25 are 7.000000000000001 in floating point: 7 tokens, not 8
    assert (
        selected_counts(torch.tensor([50]), 0.14).tolist()
        == selected_counts(torch.tensor([25]), 0.28).tolist()
        == [7]
    )
    assert selected_counts(torch.tensor([3]), 0.05).tolist() == [1]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_rho_one_is_plain_nll_sft_exactly(gamma):
    algo, nll = sstoken(rho=1.0, gamma=gamma), build_algorithm("sft", {})
    samples = [Sample(prompt_ids=[1], response_ids=[3] * n) for n in (4, 3, 1)]
    torch.testing.assert_close(
        algo.token_weights(view(samples)), nll.token_weights(view(samples)), rtol=0, atol=0
    )
    logp = f64(LOGP).requires_grad_(True)
    mine, _ = algo.token_loss(hand_tokens(logp))
    plain, _ = nll.token_loss(hand_tokens(logp))
    assert torch.equal(mine, plain)
    assert torch.equal(*(torch.autograd.grad(x.sum(), logp)[0] for x in (mine, plain)))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 0.0])
def test_the_loss_does_not_depend_on_the_split(gamma):
    """1, 2 or 4 micro-batches on 1 to 3 ranks (`split_check.SPLITS`): loss and gradient equal."""
    algo = sstoken(gamma=gamma)
    samples, logp = make_batch(seed=3)
    g = torch.Generator().manual_seed(4)
    for s in samples:
        s.extra[HISTORY_LOGP] = -torch.rand(s.num_tokens, generator=g, dtype=torch.float64) * 3
        s.extra[PROMPT_ATTENTION] = torch.rand(s.num_tokens, generator=g, dtype=torch.float64)
    for num_ranks, max_tokens, max_seqs in SPLITS:
        assert_split_invariant(algo, samples, logp, num_ranks, max_tokens, max_seqs)


def test_config_defaults_needs_and_refusals():
    algo = sstoken()
    assert (algo.cfg.gamma, algo.cfg.rho, algo.cfg.history_model) == (0.5, 0.6, "reference")
    assert algo.needs.reference and algo.needs.history_model == "reference" and algo.needs.prompt_attention
    ema = sstoken(history_model="ema", ema_decay=0.9).needs
    assert (ema.reference, ema.history_model, ema.ema_decay, ema.prompt_attention) == (
        False,
        "ema",
        0.9,
        True,
    )
    assert sstoken(history_model="ema").needs.ema_decay == 0.99
    only_attn = sstoken(gamma=0.0).needs  # a signal of weight 0 is not computed
    assert (only_attn.reference, only_attn.history_model, only_attn.prompt_attention) == (False, None, True)
    assert not sstoken(gamma=1.0).needs.prompt_attention
    with pytest.raises(ConfigError, match=r"algorithm\.ema_decay is set but algorithm\.history_model"):
        sstoken(ema_decay=0.9)
    for key, value in (("rho", 0.0), ("gamma", 1.5), ("history_model", "base"), ("ema_decay", 1.0)):
        params = {key: value, **({"history_model": "ema"} if key == "ema_decay" else {})}
        with pytest.raises(ConfigError, match=rf"algorithm\.{key}"):
            sstoken(**params)


def test_ema_update_numbers():
    """theta_his <- d theta_his + (1 - d) theta for trainable parameters only, kept in fp32 (a
    bf16 policy's copy holds the fp32 average cast), and its state round trip."""
    policy = torch.nn.Linear(2, 1).to(torch.bfloat16)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[1.0, -2.0]]))
        policy.bias.copy_(torch.tensor([0.5]))
    policy.bias.requires_grad_(False)
    ema = EMAPolicy(policy, decay=0.9)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[2.0, -2.0]]))
        policy.bias.copy_(torch.tensor([4.0]))  # frozen: never averaged
    ema.update(policy)
    ema.update(policy)
    # 1 -> 0.9 + 0.2 = 1.1 -> 0.99 + 0.2 = 1.19; -2 stays
    torch.testing.assert_close(ema.average["weight"], torch.tensor([[1.19, -2.0]]))
    torch.testing.assert_close(ema.model.weight, torch.tensor([[1.19, -2.0]]).to(torch.bfloat16))
    assert ema.model.bias.item() == 0.5 and not ema.model.weight.requires_grad
    state = ema.state_dict()
    fresh = EMAPolicy(policy, decay=0.9)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.average["weight"], ema.average["weight"], rtol=0, atol=0)
    torch.testing.assert_close(fresh.model.weight, ema.model.weight, rtol=0, atol=0)

    fp32 = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        fp32.weight.fill_(3.0)
    avg = EMAPolicy(fp32, decay=0.75)
    with torch.no_grad():
        fp32.weight.fill_(7.0)
    avg.update(fp32)
    assert avg.model.weight.item() == 4.0  # 0.75 x 3 + 0.25 x 7, the copy is its own average


def gqa_policy() -> PolicyModel:
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return PolicyModel(LlamaForCausalLM(config), chunk_size=16)


@pytest.mark.parametrize("packed", [False, True])
def test_prompt_attention_equals_the_full_attention_matrix(packed):
    """Per response token: the last layer's eager attention probabilities (every head, every
    position) from the token's own position to the prompt, summed, averaged over heads."""
    policy = gqa_policy()
    samples = [
        Sample(prompt_ids=[1, 4, 5, 6], response_ids=[7, 8, 9]),
        Sample(prompt_ids=[1, 3], response_ids=[5, 6, 7, 8, 9, 10]),
        Sample(prompt_ids=[2, 9, 9, 9, 9], response_ids=[11]),
    ]
    attention = PromptAttention(policy)
    batch = collate(samples, 0, packed)
    inputs = {k: batch[k] for k in ("input_ids", "pred_pos", "targets")}
    policy(**inputs, **packed_kwargs(batch, "cpu"))
    got = attention.scores(batch)
    with pytest.raises(RuntimeError, match="did not run"):  # read once
        attention.scores(batch)
    attention.close()
    want = []
    policy.lm.set_attn_implementation("eager")
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        full = policy.lm(input_ids=ids, output_attentions=True).attentions[-1][0]  # [heads, S, S]
        want.append(full[:, len(s.prompt_ids) :, : len(s.prompt_ids)].sum(-1).mean(0))
    torch.testing.assert_close(got, torch.cat(want).detach(), rtol=1e-5, atol=1e-6)
    assert got[-1] < 1  # the one-token response attends to itself too
