"""HAPO's adaptive temperature: the rule's numbers, and the transformers engine and
the learner applying the same per-token T_t (the vLLM engine: test_vllm_engine.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.algorithms.hapo import EntropyStats, TemperatureRule, entropy_stats

# Stats chosen so that the three rows below land on the positive side, the negative
# side and past the clamp: p = -1, s = 0.5, max(h+) = 2, min(h-) = -3.
STATS = EntropyStats(p=-1.0, s=0.5, max_pos=2.0, min_neg=-3.0)


def test_rule_numbers():
    rule = TemperatureRule(STATS, tau=0.05)
    logits = torch.tensor([[0.0, 0.0, -math.inf], [math.log(9.0), 0.0, -math.inf], [0.0, 0.0, 0.0]])
    # by hand: H = ln 2 -> e = -0.366513, h = 1.266974, h_hat = h / 2 = 0.633487
    #          H(0.9, 0.1) = 0.325083 -> e = -1.123675, h = -0.247350, h_hat = h / 3 = -0.082450
    #          H = ln 3 -> e = 0.094048, h = 2.188096, h_hat = 1.094 -> clamped to 1
    expected_factor = torch.tensor([1.0316744, 0.9958775, 1.05])
    scaled = logits.clone()
    got = rule.apply(scaled)
    assert got.data_ptr() == scaled.data_ptr()  # in place
    torch.testing.assert_close(got, logits / expected_factor[:, None], rtol=1e-6, atol=0)
    entropy = torch.tensor([math.log(2.0), 0.3250829733914482, math.log(3.0)])
    torch.testing.assert_close(rule.factor(entropy), expected_factor, rtol=1e-6, atol=0)


def test_rule_tau_zero_is_plain_temperature_and_round_trips():
    rule = TemperatureRule(STATS, tau=0.0)
    logits = torch.randn(4, 11)
    assert torch.equal(rule.apply(logits.clone()), logits)
    rule = TemperatureRule(entropy_stats(torch.rand(50)), tau=0.05)
    assert TemperatureRule.from_dict(rule.to_dict()) == rule


def test_hapo_hands_out_a_rule_unless_tau_is_zero():
    entropy = torch.rand(40) + 0.01
    rule = build_algorithm("hapo", {}).sampling_rule(entropy)
    assert rule == TemperatureRule(entropy_stats(entropy, q=0.8), tau=0.05)
    # the batch's own extremes get T_t = T (1 -+ tau)
    factors = rule.factor(entropy)
    assert factors.min().item() == pytest.approx(0.95) and factors.max().item() == pytest.approx(1.05)
    assert build_algorithm("hapo", {"tau": 0.0}).sampling_rule(entropy) is None
    assert build_algorithm("grpo", {}).sampling_rule(entropy) is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlpost.config.sections import ModelConfig
    from rlpost.model.load import materialise_initial_model

    return materialise_initial_model(
        ModelConfig(hidden_size=64, num_heads=2),
        alphabet="0123456789+=",
        seed=0,
        out_dir=tmp_path_factory.mktemp("m") / "m",
        max_len=64,
    )


def rule_logprobs(
    model, seq: list[int], prompt_len: int, temperature: float, rule: TemperatureRule, top_p: float = 1.0
) -> torch.Tensor:
    """Independent of the engines: full logits in fp64, entropy at T, then T_t, then
    top-p (keep the most probable tokens until their mass reaches top_p; renormalise)."""
    with torch.no_grad():
        x = torch.tensor([seq])
        z = model(x).logits[0, :-1].double() / temperature
        log_p = z.log_softmax(-1)
        factor = rule.factor(-(log_p.exp() * log_p).sum(-1))
        log_q = (z / factor[:, None]).log_softmax(-1)
        probs, order = log_q.exp().sort(-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        kept = torch.zeros_like(log_q, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
        log_q = log_q.masked_fill(~kept, -math.inf).log_softmax(-1)
        lp = log_q.gather(-1, x[0, 1:, None])[:, 0]
    return lp[prompt_len - 1 :]


PROMPTS = [[1, 4, 5, 13, 6], [1, 7, 14, 8], [1, 3, 3, 13, 9, 9, 14]]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_hf_engine_samples_at_the_rule_temperature(model_dir, top_p):
    from rlpost.engines.hf_engine import HFEngine
    from rlpost.model.load import load_model

    engine = HFEngine(str(model_dir))
    model = load_model(model_dir)
    T = 0.8
    stats = entropy_stats(torch.rand(100) * 2.5 + 0.05)
    rule = TemperatureRule(stats, tau=0.5)  # large tau: T_t far from T
    out = engine.generate(PROMPTS, n=4, temperature=T, top_p=top_p, max_new_tokens=6, seed=1, rule=rule)
    plain = engine.generate(PROMPTS, n=4, temperature=T, top_p=top_p, max_new_tokens=6, seed=1)
    d_rule = d_plain = 0.0
    for p, comps, plain_comps in zip(PROMPTS, out, plain):
        for c in comps:
            ref = rule_logprobs(model, p + c.ids, len(p), T, rule, top_p)
            d_rule = max(d_rule, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
        for c in plain_comps:
            ref = rule_logprobs(model, p + c.ids, len(p), T, rule, top_p)
            d_plain = max(d_plain, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
    assert d_rule < 1e-5
    assert d_plain > 1e-2  # the rule made a difference the check above would have seen


def test_learner_scores_at_the_rule_temperature(model_dir):
    """PolicyModel (the learner's forward) with a rule: entropies at T, log-probs at T_t."""
    from rlpost.data.batch import Sample, collate
    from rlpost.model.load import load_model
    from rlpost.model.policy import PolicyModel

    model = load_model(model_dir)
    policy = PolicyModel(model, chunk_size=3).eval()
    T = 0.8
    rule = TemperatureRule(entropy_stats(torch.rand(100) * 2.5 + 0.05), tau=0.5)
    samples = [
        Sample(prompt_ids=p, response_ids=r) for p, r in zip(PROMPTS, [[4, 5, 2], [6, 6, 6, 6, 7], [2]])
    ]
    for packed in (False, True):
        batch = collate(samples, pad_id=0, packed=packed)
        attention = (
            {"position_ids": batch["position_ids"]} if packed else {"attention_mask": batch["attention_mask"]}
        )
        with torch.no_grad():
            logp, entropy = policy(
                batch["input_ids"], batch["pred_pos"], batch["targets"], T, rule=rule, **attention
            )
            _, plain_entropy = policy(batch["input_ids"], batch["pred_pos"], batch["targets"], T, **attention)
        ref = torch.cat(
            [rule_logprobs(model, s.prompt_ids + s.response_ids, len(s.prompt_ids), T, rule) for s in samples]
        )
        torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy, plain_entropy, rtol=0, atol=0)
