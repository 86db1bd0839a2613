"""`rlpost cdpo`'s parts: its config (stage configs, errors before start-up), the pairs it
builds, the contrastive scorer against the formula, and the stage bookkeeping that makes a
rerun skip finished stages and redo changed ones."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rlpost.config.cdpo import stage_config
from rlpost.data.trajectories import make_pairs
from rlpost.errors import ConfigError
from rlpost.jobs.cdpo import weighted_label
from rlpost.jobs.preflight import load_cdpo_config
from rlpost.jobs.stages import Stages
from rlpost.model.load import build_tiny_model, char_tokenizer
from rlpost.workers.contrast import ContrastScorer
from tests.run_helpers import ROOT

CONFIG = ROOT / "configs" / "cdpo_quickstart.yaml"


# ----- config -----------------------------------------------------------------------------
def test_stage_configs_come_from_the_sections_over_the_defaults():
    cfg = load_cdpo_config(CONFIG, ["cdpo.dpo.algorithm.beta=0.2", "learner.micro_batch_size=16"])
    pos = stage_config(cfg, "positive", "/start", "/pos.jsonl")
    assert (pos.learner.lr, pos.learner.lora.r, pos.epochs, pos.batch_size) == (3e-4, 8, 1, 32)
    assert pos.learner.micro_batch_size == 16  # the learner section is inherited
    assert (pos.model.kind, pos.model.path, pos.data.path) == ("hf", "/start", "/pos.jsonl")
    dpo = stage_config(cfg, "dpo", "/start", "/pairs.jsonl")
    base = stage_config(cfg, "baseline", "/start", "/pairs.jsonl")
    assert (dpo.algorithm.loss, dpo.algorithm.beta, dpo.learner.lr, dpo.learner.lora) == (
        "cdpo",
        0.2,
        1e-4,
        None,
    )
    assert (base.algorithm.loss, base.algorithm.beta) == ("dpo", 0.2)
    assert (dpo.tracking.group, dpo.tracking.run_name) == ("cdpo_quickstart", "cdpo_quickstart/dpo")
    assert dpo.seed == cfg.seed and dpo.mode == cfg.mode


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=10", "key 'steps' is for rlpost train"),
        ("algorithm.name=dapo", "key 'algorithm' is for rlpost train"),
        ("cdpo.dpo.model.path=/x", "key 'cdpo.dpo.model' is set by the pipeline"),
        ("cdpo.contrast.data.path=/x", "key 'cdpo.contrast.data.path' is set by the pipeline"),
        ("cdpo.problems=5000", "key 'cdpo.problems': 5000 is more than the task's training problems"),
        ("cdpo.dpo.algorithm.loss=ipo", "section 'cdpo.dpo': key 'algorithm.loss'"),
        ("cdpo.contrast.learner.lora.r=0", "section 'cdpo.contrast': key 'learner.lora.r'"),
        ("cdpo.dpo.algorithm.alpha=0.3", "algorithm.alpha is set but algorithm.loss is 'cdpo'"),
    ],
)
def test_config_errors_name_the_key_before_anything_starts(override, message):
    with pytest.raises(ConfigError) as e:
        load_cdpo_config(CONFIG, [override])
    assert str(e.value).startswith(f"{CONFIG} (with overrides): ") and message in str(e.value)


def test_results_name_the_weighted_stage_by_its_loss():
    base = ROOT / "configs" / "cdpo_quickstart.yaml"
    assert weighted_label(load_cdpo_config(base)) == "cdpo"
    assert weighted_label(load_cdpo_config(base, ["cdpo.dpo.algorithm.loss=treg"])) == "treg"
    # plain DPO in the weighted stage must not take the baseline's name
    assert weighted_label(load_cdpo_config(base, ["cdpo.dpo.algorithm.loss=dpo"])) == "dpo_stage"


def test_no_rl_mini_batch_rule():
    # 128 problems x 6 trajectories is not a multiple of learner.mini_batch_size (128): RL
    # would refuse it, the pipeline has no RL mini-batches
    assert load_cdpo_config(CONFIG, ["rollout.n=6"]).rollout.n == 6


# ----- pairs ------------------------------------------------------------------------------
def test_pairs_take_each_distinct_incorrect_response_with_the_correct_ones_in_turn():
    def s(problem, response, correct):
        return {"problem": problem, "response": response, "correct": correct}

    samples = [
        s(0, "a", True),
        s(0, "x", False),
        s(0, "b", True),
        s(0, "x", False),
        s(0, "y", False),
        s(0, "z", False),
        s(0, "a", True),
        s(1, "u", False),
        s(2, "c", True),
        s(0, "w", False),
        s(0, " ", False),
    ]  # empty: no data format can hold it
    assert make_pairs(samples, per_problem=3) == [
        {"problem": 0, "chosen": "a", "rejected": "x"},
        {"problem": 0, "chosen": "b", "rejected": "y"},
        {"problem": 0, "chosen": "a", "rejected": "z"},
    ]
    assert len(make_pairs(samples, per_problem=10)) == 4  # x, y, z, w; problem 1 has no correct one


# ----- contrastive scorer -------------------------------------------------------------------
def test_scorer_weights_equal_the_formula_per_sequence(tmp_path):
    """w_t = 1 - softmax((1 + g) z_pos - g z_neg)[y_t], from each sequence's own full logits,
    against the scorer's padded micro-batches of 2 and chunks of 3 tokens."""
    tok = char_tokenizer("0123456789+=")
    cfg = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, dtype="float32")
    dirs = []
    for seed in (1, 2):
        d = tmp_path / f"m{seed}"
        build_tiny_model(cfg, len(tok), seed).save_pretrained(d)
        dirs.append(str(d))
    gen = torch.Generator().manual_seed(0)
    trajectories = [
        (
            torch.randint(3, len(tok), (p,), generator=gen).tolist(),
            torch.randint(3, len(tok), (r,), generator=gen).tolist(),
        )
        for p, r in ((3, 4), (5, 1), (2, 7), (4, 4), (6, 2))
    ]
    gamma = 0.5
    scorer = ContrastScorer(
        *dirs,
        dtype="float32",
        gamma=gamma,
        pad_id=tok.pad_token_id,
        chunk_size=3,
        micro_batch_tokens=None,
        micro_batch_size=2,
    )
    got = scorer.weights(trajectories)
    models = [build_tiny_model(cfg, len(tok), seed).eval() for seed in (1, 2)]
    for (prompt, response), w in zip(trajectories, got):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            z_pos, z_neg = [m(ids).logits[0, len(prompt) - 1 : -1].double() for m in models]
        s = torch.softmax((1 + gamma) * z_pos - gamma * z_neg, -1)[
            torch.arange(len(response)), torch.tensor(response)
        ]
        assert len(w) == len(response)
        torch.testing.assert_close(torch.tensor(w, dtype=torch.float64), 1 - s, rtol=0, atol=2e-6)
    # random models give near-uniform logits (w near 1 - 1/15), but not equal weights
    assert max(max(w) for w in got) - min(min(w) for w in got) > 0.02


# ----- stages -----------------------------------------------------------------------------
def stages(run_dir, print_line=print):
    return Stages(run_dir / "stages", print_line)


def test_a_rerun_skips_finished_stages_and_redoes_changed_ones(tmp_path):
    calls = []

    def build(name, value):
        def run(directory):
            calls.append(name)
            (directory / "artifact").write_text(str(value))
            return {"value": value}

        return run

    first = stages(tmp_path)
    assert first.run("a", {"x": 1}, (), build("a", 1)) == {"value": 1}
    assert first.run("b", {"y": 1}, ("a",), build("b", 2)) == {"value": 2}
    assert calls == ["a", "b"]

    lines = []
    again = stages(tmp_path, lines.append)  # the same inputs: nothing runs, the records come back
    assert again.run("a", {"x": 1}, (), build("a", 1)) == {"value": 1}
    assert again.run("b", {"y": 1}, ("a",), build("b", 2)) == {"value": 2}
    assert calls == ["a", "b"] and lines == ["a: complete, skipped", "b: complete, skipped"]

    changed = stages(tmp_path)  # a's inputs change: a and b (which reads a) run again
    changed.run("a", {"x": 2}, (), build("a", 3))
    changed.run("b", {"y": 1}, ("a",), build("b", 4))
    assert calls == ["a", "b", "a", "b"]
    assert (tmp_path / "stages" / "b" / "artifact").read_text() == "4"


def test_an_interrupted_stage_keeps_its_directory_only_for_the_same_inputs(tmp_path):
    p = stages(tmp_path)
    directory, record = p.begin("train", {"lr": 1}, ())
    assert record is None
    (directory / "checkpoint").write_text("step 3")  # killed before finish
    directory, record = stages(tmp_path).begin("train", {"lr": 1}, ())
    assert record is None and (directory / "checkpoint").read_text() == "step 3"
    directory, _ = stages(tmp_path).begin("train", {"lr": 2}, ())
    assert not (directory / "checkpoint").exists()
    assert json.loads((directory / "inputs.json").read_text())["inputs"] == {"lr": 2}
