"""HFEngine's stops (EOS, rollout.stop_token_ids, rollout.stop strings) and truncation flags,
on a tiny Llama whose generated ids are known (tests/engines/successor.py), and a long
response through the learner's micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.config.sections import ModelConfig, RolloutConfig
from rlpost.data.batch import Sample, collate, shard
from rlpost.engines.hf_engine import HFEngine, _StopOnText
from rlpost.model.attention import packed_kwargs
from rlpost.model.load import load_model, materialise_initial_model
from rlpost.model.policy import PolicyModel
from tests.engines.successor import ALPHABET, EOS, chain, ids, successor_model_dir, tok

BOS = 1
PLUS = tok("+")
MODES = ["greedy", "sampled", "rule"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # on a shared 2-core machine a tiny model's decode steps run ~30x slower with 2 threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return successor_model_dir(tmp_path_factory.mktemp("hf") / "m")


@pytest.fixture(scope="module")
def letters_dir(tmp_path_factory):
    # transformers' StopStringCriteria probes the vocabulary by encoding "abcdef"; the
    # task alphabet alone cannot, so only this vocabulary takes its tensor pre-test
    return successor_model_dir(tmp_path_factory.mktemp("hf") / "letters", extra_chars="abcdef")


def generate(engine: HFEngine, lasts: str, mode: str, max_new: int, n: int = 2):
    """Completions of one prompt per character of `lasts` (BOS, then that character)."""
    rule = None
    if mode == "rule":
        from rlpost.algorithms.hapo import TemperatureRule, entropy_stats

        stats = entropy_stats(torch.rand(100, generator=torch.Generator().manual_seed(0)) * 2.5 + 0.05)
        rule = TemperatureRule(stats, tau=0.5)
    prompts = [[BOS, tok(ch)] for ch in lasts]
    t = 0.0 if mode == "greedy" else 1.0
    return engine.generate(prompts, n=n, temperature=t, top_p=1.0, max_new_tokens=max_new, seed=3, rule=rule)


def check(out, expected: list[tuple[list[int], bool]]) -> None:
    """Each prompt's every completion is exactly `ids`, `truncated`, and every token had
    probability 1 under the successor model."""
    assert len(out) == len(expected)
    for comps, (want, truncated) in zip(out, expected):
        for c in comps:
            assert (c.ids, c.truncated) == (want, truncated)
            assert len(c.logprobs) == len(c.ids)
            assert max(map(abs, c.logprobs), default=0.0) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_stop_token_id_ends_the_completion_after_it(model_dir, mode):
    engine = HFEngine(str(model_dir), RolloutConfig(stop_token_ids=[PLUS]))
    out = generate(engine, "59764+", mode, max_new=4)
    check(
        out,
        [
            (ids("6789"), True),  # + would have been the 5th token
            (ids("+"), False),
            (ids("89+"), False),
            (ids("789+"), False),  # the stop is the last token the limit allows
            (ids("5678"), True),
            (ids("=") + [EOS], False),  # EOS still ends it
        ],
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vocab", ["task", "letters"])
def test_stop_string_cuts_right_after_the_matching_token(model_dir, letters_dir, vocab, mode):
    directory = model_dir if vocab == "task" else letters_dir
    cfg = RolloutConfig(stop=["9+", "45"], stop_token_ids=[tok("=")])
    engine = HFEngine(str(directory), cfg)
    tensor_match = _StopOnText(engine.tokenizer, cfg.stop, width=2).tensor_match
    assert (tensor_match is not None) == (vocab == "letters")
    out = generate(engine, "68953+", mode, max_new=4)
    check(
        out,
        [
            (ids("789+"), False),  # "9+" spans two tokens: cut after the one completing it
            (ids("9+"), False),
            # a stop string that begins in the prompt does not count (vLLM matches the
            # response text only): the = stop id ends it, not the first token
            (ids("+="), False),
            (ids("6789"), True),
            (ids("45"), False),  # the earliest of several stop strings
            (ids("="), False),
        ],
    )


def test_no_stops_truncated_only_by_the_limit(model_dir):
    out = generate(HFEngine(str(model_dir), RolloutConfig()), "69+", "sampled", max_new=3)
    check(out, [(ids("789"), True), (ids("+=") + [EOS], False), (ids("=") + [EOS], False)])


@pytest.mark.parametrize("stops", [{"stop_token_ids": [PLUS]}, {"stop": ["+"]}])
def test_rows_of_a_sampled_group_stop_at_their_own_length(model_dir, stops):
    """After 2 the model draws 3 or + with probability 1/2 each: the rows of one call end
    at different steps, and none returns the padding after its end."""
    engine = HFEngine(str(model_dir), RolloutConfig(**stops))
    (comps,) = generate(engine, "1", "sampled", max_new=12, n=16)
    short, long = ids("2+"), ids("23456789+")
    assert {tuple(c.ids) for c in comps} == {tuple(short), tuple(long)}
    for c in comps:
        assert not c.truncated
        # log-probs line up with the ids: the coin toss is the second token
        want = [0.0, math.log(0.5)] + [0.0] * (len(c.ids) - 2)
        assert c.logprobs == pytest.approx(want, abs=1e-5)


def test_long_response_on_the_learner_path(tmp_path):
    """A response of thousands of tokens (over learner.micro_batch_tokens) gets a
    micro-batch of its own, packed or padded, and its log-probs are the model's."""
    cycle = successor_model_dir(tmp_path / "cycle", cycle=True)
    prompt = [BOS, tok("5")]
    (comps,) = HFEngine(str(cycle), RolloutConfig()).generate([prompt], 1, 1.0, 1.0, 2048, seed=0)
    long = comps[0]
    assert len(long.ids) == 2048 and long.truncated and EOS not in long.ids
    assert long.ids == ids("".join(ALPHABET[(6 + k) % 12] for k in range(2048)))  # 6789+=0123...

    samples = [Sample(prompt_ids=prompt, response_ids=long.ids, truncated=True)]
    samples += [Sample(prompt_ids=[BOS, tok(ch)], response_ids=chain(ch, 6)) for ch in "0135678"]
    budget = 512  # learner.micro_batch_tokens, under the long sequence's 2050 tokens
    scorer = materialise_initial_model(ModelConfig(), ALPHABET, seed=1, out_dir=tmp_path / "r", max_len=4096)
    policy = PolicyModel(load_model(scorer).eval(), chunk_size=256)

    def reference(s: Sample) -> torch.Tensor:
        seq = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = policy.lm(seq).logits[0, len(s.prompt_ids) - 1 : -1]
        return logits.log_softmax(-1).gather(-1, seq[0, len(s.prompt_ids) :, None])[:, 0]

    for packed in (True, False):
        (micros,) = shard(samples, 1, max_tokens=budget, packed=packed)
        assert [s.response_ids for s in micros[0]] == [long.ids]  # alone in the first
        assert len(micros) == 2 and len(micros[1]) == 7  # the short ones share one
        assert sorted(map(id, (s for m in micros for s in m))) == sorted(map(id, samples))
        for micro in micros:
            batch = collate(micro, pad_id=0, packed=packed)
            with torch.no_grad():
                attention = packed_kwargs(batch, "cpu")
                logp, _ = policy(batch["input_ids"], batch["pred_pos"], batch["targets"], **attention)
            torch.testing.assert_close(logp, torch.cat([reference(s) for s in micro]), atol=1e-4, rtol=0)
