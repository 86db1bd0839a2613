"""`rlpost dpo` with `algorithm.loss: treg` end to end on the tiny model (in this process):
the token rewards are computed once before training, are what the starting (reference)
model gives the responses under the two revision prompts (checked against full logits,
token by token in the token view and on average in the metrics), and the T-REG metrics
appear at every step and in every evaluation."""

from __future__ import annotations

import json
import math
import random
import re
import string

import pytest
import torch

from rlpost.algorithms.treg import BETTER_PROMPT, WORSE_PROMPT
from rlpost.cli import main
from rlpost.jobs.offline import DPOTrainer
from rlpost.jobs.preflight import load_offline_config
from rlpost.model.load import char_tokenizer, load_model
from tests.run_helpers import ROOT, only_run_dir, read_metrics

CONFIG = ROOT / "tests" / "configs" / "dpo_tiny.yaml"
BETA, ALPHA = 0.1, 0.5
METRICS = ("treg/token_reward_chosen", "treg/token_reward_rejected", "treg/weight", "treg/reg_loss")


def write_pairs(path):
    rng = random.Random(1)
    rows = []
    for _ in range(10):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice((-1, 1)))}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def by_formula(model, tok, row: dict) -> dict[str, torch.Tensor]:
    """r_t and log pi_ref of each response of a row, from full logits in float64, the prompts
    written out here: BOS + the text; the response + EOS."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731

    def logp(prompt: list[int], response: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]

    out = {}
    for side in ("chosen", "rejected"):
        response = enc(row[side]) + [tok.eos_token_id]
        better, worse = (
            logp([tok.bos_token_id] + enc(t.replace("{prompt}", row["prompt"])), response)
            for t in (BETTER_PROMPT, WORSE_PROMPT)
        )
        out[side] = torch.sigmoid(better - worse) - 0.5
        out[f"{side}_logp"] = logp([tok.bos_token_id] + enc(row["prompt"]), response)
    return out


def test_treg_run(tmp_path, capsys):
    rows = write_pairs(tmp_path / "pairs.jsonl")
    overrides = [
        f"data.path={tmp_path / 'pairs.jsonl'}",
        "algorithm.loss=treg",
        f"algorithm.treg_alpha={ALPHA}",
    ]
    assert main(["dpo", str(CONFIG), *overrides, f"output_dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    run = only_run_dir(tmp_path / "runs")
    assert re.search(r"^treg: token rewards of 10 pairs \(\d+ tokens\) in [\d.]+s$", out, re.M)
    assert out.index("treg: token rewards") < out.index("step 0/2")  # before the step-0 evaluation

    metrics = read_metrics(run)
    assert sorted(metrics) == [0, 1, 2]
    assert all(f"eval/{m}" in metrics[s] for m in METRICS for s in (0, 2))
    assert all(m in metrics[s] for m in METRICS for s in (1, 2))

    # the same split of the rows as the run's (seeded), and the formula on the starting model
    split = DPOTrainer(load_offline_config("dpo", CONFIG, overrides))
    held_out, train = [rows[p.row] for p in split.eval_rows], [rows[p.row] for p in split.train_rows]
    model, tok = load_model(run / "models" / "initial"), char_tokenizer(string.printable)
    want = {id(r): by_formula(model, tok, r) for r in rows}

    def mean(rs, side):
        return torch.cat([want[id(r)][side] for r in rs]).mean().item()

    # the r_t are constants: the held-out means are the same before and after training
    for step in (0, 2):
        for side in ("chosen", "rejected"):
            got = metrics[step][f"eval/treg/token_reward_{side}"]
            assert got == pytest.approx(mean(held_out, side), rel=1e-3, abs=1e-8), (step, side)
    # step 1 trains on every training pair, its policy still the reference: w = 1/2 exactly
    first = metrics[1]
    assert first["treg/token_reward_chosen"] == pytest.approx(mean(train, "chosen"), rel=1e-3, abs=1e-8)
    assert first["treg/token_reward_rejected"] == pytest.approx(mean(train, "rejected"), rel=1e-3, abs=1e-8)
    assert first["treg/weight"] == 0.5
    reg = [
        -ALPHA
        * 0.5
        * BETA
        * sum((want[id(r)][s] * want[id(r)][f"{s}_logp"]).sum().item() for s in ("chosen", "rejected"))
        for r in train
    ]
    assert first["treg/reg_loss"] == pytest.approx(sum(reg) / len(reg), rel=1e-3, abs=1e-9)
    assert first["loss"] == pytest.approx(math.log(2) + sum(reg) / len(reg), rel=1e-6)

    # token by token: the view's r_t of the held-out pairs (4 significant digits)
    page = (run / "token_rewards.html").read_text()
    shown = [float(x) for x in re.findall(r'title="token reward r_t: ([^"]+)"', page)]
    expected = [v for r in held_out for side in ("chosen", "rejected") for v in want[id(r)][side].tolist()]
    assert shown == pytest.approx(expected, rel=1e-3, abs=1e-9)
    assert max(abs(v) for v in expected) > 1e-5  # the two prompts do differ for the model
