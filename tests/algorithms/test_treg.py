"""T-REG (docs/algorithms.md section 8) against its formulas written out with the math module
on hand-made numbers: the token reward, the loss and its gradient (w a stop-gradient), the
metrics; alpha 0 is DPO exactly; the config (defaults, placeholder, printable ASCII for the
tiny model, settings refused under another loss) and the revised prompts the loader
tokenizes, text and conversations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlpost.algorithms.pairs import pair_sums
from rlpost.algorithms.preference import PreferenceConfig, dpo_loss, preference_loss, preference_metrics
from rlpost.algorithms.treg import token_reward, treg_loss
from rlpost.config.cdpo import stage_config
from rlpost.data.datasets import load_preference_pairs, revise
from rlpost.errors import ConfigError
from rlpost.jobs.offline import DPOTrainer
from rlpost.jobs.preflight import load_cdpo_config, load_offline_config
from rlpost.model.load import char_tokenizer
from tests.run_helpers import ROOT

# Two pairs, hand-made. Per token: (pair, chosen, logp, ref_logp, r_t)
TOKENS = [
    (0, True, -1.0, -1.5, 0.30),
    (0, True, -2.0, -1.0, -0.10),
    (0, False, -0.5, -0.7, -0.40),
    (1, True, -0.3, -0.4, 0.05),
    (1, False, -1.2, -2.0, 0.20),
    (1, False, -0.1, -0.1, -0.25),
    (1, False, -3.0, -2.5, 0.00),
]
BETA, ALPHA = 0.1, 0.5


def tensors():
    cols = list(zip(*TOKENS))
    logp = torch.tensor(cols[2], dtype=torch.float64, requires_grad=True)
    ref, r = (torch.tensor(c, dtype=torch.float64) for c in (cols[3], cols[4]))
    return torch.tensor(cols[0]), torch.tensor(cols[1]), logp, ref, r


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def side_sum(pair: int, chosen: bool, fn) -> float:
    return sum(fn(t) for t in TOKENS if t[0] == pair and t[1] == chosen)


def by_hand(pair: int) -> dict[str, float]:
    delta_w = side_sum(pair, True, lambda t: t[2] - t[3])
    delta_l = side_sum(pair, False, lambda t: t[2] - t[3])
    reg = side_sum(pair, True, lambda t: t[4] * t[2]) + side_sum(pair, False, lambda t: t[4] * t[2])
    margin = BETA * (delta_w - delta_l)
    w = sigmoid(-margin)  # sigmoid(r_DPO(y_l) - r_DPO(y_w))
    return {"margin": margin, "w": w, "reg": reg, "loss": -math.log(sigmoid(margin)) - ALPHA * w * BETA * reg}


def test_token_reward_from_two_log_prob_vectors():
    better = torch.tensor([-0.2, -3.0, -1.0, -50.0, -0.01], dtype=torch.float64)
    worse = torch.tensor([-1.2, -1.0, -1.0, 0.0, -0.02], dtype=torch.float64)
    want = [sigmoid(b - w) - 0.5 for b, w in zip(better.tolist(), worse.tolist())]
    assert want[0] == pytest.approx(0.2310585786300049) and want[2] == 0.0
    torch.testing.assert_close(token_reward(better, worse), torch.tensor(want, dtype=torch.float64))
    # bounded by 1/2 in size
    assert token_reward(better, worse)[3].item() == -0.5 and token_reward(better, worse).abs().max() <= 0.5


def test_loss_by_hand():
    pair, chosen, logp, ref, r = tensors()
    got = treg_loss(pair_sums(logp, ref, pair, chosen, 2, token_reward=r), BETA, ALPHA)
    want = [by_hand(p)["loss"] for p in (0, 1)]
    # pair 0 by eye: Delta_w = -0.5, Delta_l = 0.2, sum r log pi = -0.3 + 0.2 + 0.2 = 0.1
    assert want[0] == pytest.approx(-math.log(sigmoid(-0.07)) - 0.5 * sigmoid(0.07) * 0.1 * 0.1)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    cfg = PreferenceConfig(loss="treg", beta=BETA, treg_alpha=ALPHA)
    torch.testing.assert_close(
        preference_loss(pair_sums(logp, ref, pair, chosen, 2, token_reward=r), cfg), got
    )


def test_gradient_by_hand_with_w_a_stop_gradient():
    """dL/dlogp_t = -/+ beta w (chosen / rejected, DPO's) - alpha w beta r_t: nothing from w's
    own dependence on Delta, which would add alpha beta^2 w (1 - w) (reg_w + reg_l) on the
    chosen side (and subtract it on the rejected side)."""
    pair, chosen, logp, ref, r = tensors()
    treg_loss(pair_sums(logp, ref, pair, chosen, 2, token_reward=r), BETA, ALPHA).sum().backward()
    want, without_stop = [], []
    for p, side, _, _, r_t in TOKENS:
        h = by_hand(p)
        sign = -1.0 if side else 1.0
        want.append(sign * BETA * h["w"] - ALPHA * h["w"] * BETA * r_t)
        through_w = -sign * ALPHA * BETA**2 * h["w"] * (1 - h["w"]) * h["reg"]
        without_stop.append(want[-1] + through_w)
    torch.testing.assert_close(logp.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert (logp.grad - torch.tensor(without_stop, dtype=torch.float64)).abs().max() > 1e-5


def test_alpha_zero_is_dpo_exactly():
    pair, chosen, logp, ref, r = tensors()
    dpo = preference_loss(pair_sums(logp, ref, pair, chosen, 2), PreferenceConfig(loss="dpo", beta=BETA))
    (dpo_grad,) = torch.autograd.grad(dpo.sum(), logp)
    cfg = PreferenceConfig(loss="treg", beta=BETA, treg_alpha=0.0)
    treg = preference_loss(pair_sums(logp, ref, pair, chosen, 2, token_reward=r), cfg)
    (treg_grad,) = torch.autograd.grad(treg.sum(), logp)
    assert torch.equal(treg, dpo) and torch.equal(treg_grad, dpo_grad)
    assert torch.equal(dpo, dpo_loss(pair_sums(logp, ref, pair, chosen, 2), BETA))


def test_loss_needs_the_token_rewards():
    pair, chosen, logp, ref, _ = tensors()
    with pytest.raises(ValueError, match="treg needs PairSums.reg: pass token_reward to pair_sums"):
        treg_loss(pair_sums(logp, ref, pair, chosen, 2))


def test_metrics_by_hand():
    pair, chosen, logp, ref, r = tensors()
    cfg = PreferenceConfig(loss="treg", beta=BETA, treg_alpha=ALPHA)
    got = preference_metrics(pair_sums(logp, ref, pair, chosen, 2, token_reward=r), cfg)
    assert got["treg/token_reward_chosen"] == pytest.approx((0.30 - 0.10 + 0.05) / 3)
    assert got["treg/token_reward_rejected"] == pytest.approx((-0.40 + 0.20 - 0.25 + 0.0) / 4)
    h = [by_hand(0), by_hand(1)]
    assert got["treg/weight"] == pytest.approx((sigmoid(0.07) + sigmoid(0.02)) / 2)
    assert got["treg/weight"] == pytest.approx((h[0]["w"] + h[1]["w"]) / 2)
    # pair 1: sum r log pi = 0.05 (-0.3) + 0.2 (-1.2) - 0.25 (-0.1) = -0.23
    assert h[1]["reg"] == pytest.approx(-0.23)
    assert got["treg/reg_loss"] == pytest.approx(sum(-ALPHA * x["w"] * BETA * x["reg"] for x in h) / 2)
    # the loss is DPO's plus the regulariser's share
    dpo = sum(-math.log(sigmoid(x["margin"])) for x in h) / 2
    assert dpo + got["treg/reg_loss"] == pytest.approx(sum(x["loss"] for x in h) / 2)
    assert "treg/weight" not in preference_metrics(pair_sums(logp, ref, pair, chosen, 2), PreferenceConfig())


# ----- config --------------------------------------------------------------------------------

DPO = ROOT / "tests" / "configs" / "dpo_tiny.yaml"


def test_config_defaults_and_refusals():
    cfg = PreferenceConfig(loss="treg")
    assert (
        cfg.treg_alpha == 0.25
        and "{prompt}" in cfg.treg_better_prompt
        and "{prompt}" in cfg.treg_worse_prompt
    )
    assert "treg_alpha" in cfg.model_dump() and "treg_alpha" not in PreferenceConfig().model_dump()
    with pytest.raises(ValueError, match="algorithm.treg_alpha is set but algorithm.loss is 'dpo'"):
        PreferenceConfig(loss="dpo", treg_alpha=0.1)
    with pytest.raises(ValueError, match="algorithm.treg_worse_prompt is set but algorithm.loss is 'tdpo1'"):
        PreferenceConfig(loss="tdpo1", treg_worse_prompt="{prompt} badly")
    with pytest.raises(ValueError, match="algorithm.treg_better_prompt must contain {prompt}"):
        PreferenceConfig(loss="treg", treg_better_prompt="Answer well.")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PreferenceConfig(loss="treg", treg_alpha=-0.1)


def test_config_errors_are_one_line_naming_the_key(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4))
    )
    common = [f"data.path={pairs}", "algorithm.loss=treg", "batch_size=2", f"output_dir={tmp_path / 'runs'}"]
    with pytest.raises(ConfigError) as e:
        load_offline_config("dpo", DPO, [*common, "algorithm.treg_worse_prompt=Answer badly."])
    assert "algorithm.treg_worse_prompt must contain {prompt}" in str(e.value) and "\n" not in str(e.value)
    cfg = load_offline_config("dpo", DPO, [*common, "algorithm.treg_better_prompt=Q: {prompt} — answer well"])
    with pytest.raises(ConfigError, match=r"key 'algorithm.treg_better_prompt': '—' is not printable ASCII"):
        DPOTrainer(cfg)  # the tiny model's character tokenizer: refused before anything starts
    assert not (tmp_path / "runs").exists()
    trainer = DPOTrainer(load_offline_config("dpo", DPO, common))
    assert all(len(p.revised_prompt_ids) == 2 for p in trainer.train_rows + trainer.eval_rows)


def test_cdpo_dpo_stage_takes_treg_and_its_baseline_stays_dpo():
    config = ROOT / "configs" / "cdpo_quickstart.yaml"
    cfg = load_cdpo_config(config, ["cdpo.dpo.algorithm.loss=treg", "cdpo.dpo.algorithm.treg_alpha=0.1"])
    dpo, base = (stage_config(cfg, stage, "/start", "/pairs.jsonl") for stage in ("dpo", "baseline"))
    assert (dpo.algorithm.loss, dpo.algorithm.treg_alpha, dpo.algorithm.beta) == ("treg", 0.1, 0.1)
    assert base.algorithm_spec() == ("preference", {"loss": "dpo", "beta": 0.1})


# ----- revised prompts -----------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
BOS = 1


def test_revised_prompts_are_tokenized_as_the_prompt(tmp_path):
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 []\n?+=.:!{}")
    tok.chat_template = TEMPLATE
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    rows = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {
            "prompt": convo,
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {
            "prompt": [{"role": "system", "content": "x"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    templates = ("good: {prompt} !", "bad: {prompt}")
    (text, talk), report = load_preference_pairs(path, tok, revisions=templates)
    assert text.revised_prompt_ids == [[BOS] + enc("good: 2+2= !"), [BOS] + enc("bad: 2+2=")]
    assert talk.revised_prompt_ids == [
        enc("[system]be brief\n[user]good: 2+2? !\n[assistant]"),
        enc("[system]be brief\n[user]bad: 2+2?\n[assistant]"),
    ]
    assert talk.prompt_ids == enc("[system]be brief\n[user]2+2?\n[assistant]")  # the original unchanged
    assert report.skipped == {"malformed": [2]} and "no user message" in report.first["malformed"]
    assert load_preference_pairs(path, tok)[0][0].revised_prompt_ids is None  # only when asked
    # a literal brace elsewhere stays; every placeholder is replaced
    assert revise("x", "{a} {prompt}/{prompt}") == "{a} x/x"
    assert revise(convo, "[{prompt}]")[1]["content"] == "[2+2?]" and convo[1]["content"] == "2+2?"
