"""The token-credit view of RL (rlpost/tracking/credit_view.py): responses drawn token by token
with their advantages on one signed scale (cDPO's token view with a diverging scale), and the
deterministic choice of which responses to show."""

from __future__ import annotations

import torch
from PIL import Image

from rlpost.tracking.credit_view import pick_credit_rows, write_credit_view
from rlpost.tracking.token_view import LOW, NEGATIVE, POSITIVE, visible
from tests.tracking.test_token_view import parse

ROWS = [
    (
        "reward 1.0, group 3",
        ["a:", "27", "+5", "=32", ";", "<b>", "&", "\n", ">49", "</s>"],
        [0.5, 0.25, 0.0, 1.5, -0.1, 0.75, 0.3, 0.05, 1.0, 0.2],
    ),
    ("reward 0.0, group 3", ["a:", "27", "+5", "=22", ";", ">22"], [-0.2, -0.4, 0.0, -1.5, -0.75, -1.0]),
    ("reward 0.0, group 5", ["x", "y"], -0.5),  # a response-level advantage: every token
]


def test_files_are_written_with_the_method_and_every_token(tmp_path):
    page, image = write_credit_view(tmp_path / "credit", "step_7", ROWS, "pure <min>")
    assert page == tmp_path / "credit" / "credit_step_7.html" and image == page.with_suffix(".png")
    text = page.read_text(encoding="utf-8")
    assert "<title>pure &lt;min&gt;: per-token advantages (step_7)</title>" in text
    assert "<b>" not in text and "&lt;b&gt;" in text and "&amp;" in text and "&lt;/s&gt;" in text
    assert text.count("<section>") == 3 and "reward 1.0, group 3" in text
    assert '<div class="name">prompt</div>' not in text and '<div class="name">response</div>' in text
    spans = parse(text)
    tokens = [t for _, ts, _ in ROWS for t in ts]
    weights = [w for _, ts, a in ROWS for w in (a if isinstance(a, list) else [a] * len(ts))]
    assert [(t, title) for t, title, _ in spans] == [
        (visible(t), f"advantage: {w:.4g}") for t, w in zip(tokens, weights)
    ]
    assert "blue at -1.5, white at 0, red at 1.5" in text  # one scale: the largest |advantage|


def test_colours_follow_the_sign_and_size_of_the_advantage(tmp_path):
    page, _ = write_credit_view(tmp_path, "s", ROWS, "vineppo")
    spans = parse(page.read_text(encoding="utf-8"))
    weights = [w for _, ts, a in ROWS for w in (a if isinstance(a, list) else [a] * len(ts))]
    for w, (_, _, (r, g, b)) in zip(weights, spans):
        if w > 0:
            assert r > b, (w, (r, g, b))  # red
        elif w < 0:
            assert b > r, (w, (r, g, b))  # blue
        else:
            assert (r, g, b) == LOW  # white
    by_weight = dict(zip(weights, [rgb for _, _, rgb in spans]))
    assert by_weight[1.5] == POSITIVE and by_weight[-1.5] == NEGATIVE  # full colour at the top
    # the size: a larger |advantage| is further from white, on either side
    for small, big in ((0.25, 0.75), (-0.2, -0.75)):
        assert sum(abs(c - 255) for c in by_weight[small]) < sum(abs(c - 255) for c in by_weight[big])
    # all zeros: a scale of 1, every token white
    flat = write_credit_view(tmp_path, "zero", [("r", ["a", "b"], [0.0, 0.0])], "grpo")[0]
    assert {rgb for _, _, rgb in parse(flat.read_text(encoding="utf-8"))} == {LOW}


def test_the_png_opens_and_shows_both_signs(tmp_path):
    _, image = write_credit_view(tmp_path, "step_1", ROWS, "ppo")
    with Image.open(image) as png:
        assert png.format == "PNG" and png.size[0] > 800
        pixels = png.convert("RGB")
        w, h = png.size
        colours = {pixels.getpixel((x, y)) for x in range(0, w, 3) for y in range(0, h, 3)}

    def near(target):
        return any(sum(abs(a - b) for a, b in zip(c, target)) < 20 for c in colours)

    assert near(POSITIVE) and near(NEGATIVE)


def test_bad_rows_and_labels_are_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="reward 0.0: 2 tokens but 1 weights"):
        write_credit_view(tmp_path, "s", [("reward 0.0", ["a", "b"], [1.0])], "grpo")
    with pytest.raises(ValueError, match="label '../x' is not a file name part"):
        write_credit_view(tmp_path, "../x", ROWS, "grpo")


def group_batch():
    """4 groups of 3: group 0 all right, 1 mixed, 2 all wrong, 3 mixed (with a tie)."""
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    tokens = [[1, 2, 3][: 1 + i % 3] for i in range(12)]
    advantages = [torch.linspace(-1, 1, len(t)) for t in tokens]
    return tokens, advantages, rewards


def test_pick_credit_rows_takes_the_best_and_worst_of_the_first_mixed_groups():
    tokens, advantages, rewards = group_batch()
    picked = pick_credit_rows(tokens, advantages, rewards)
    assert picked == [4, 3, 9, 10]  # group 1: best 4, worst 3; group 3: best 9 (first of the tie), worst 10
    assert pick_credit_rows(tokens, advantages, rewards) == picked  # deterministic
    assert pick_credit_rows(tokens, advantages, rewards, k=2) == [4, 3]
    assert pick_credit_rows(tokens, advantages, rewards, k=3) == [4, 3, 9]
    # groups given per sample, rewards flat: the same picks
    groups = [i // 3 for i in range(12)]
    assert pick_credit_rows(tokens, advantages, rewards.flatten().tolist(), groups) == picked
    # too few mixed groups: then the first response of each other group, in order
    assert pick_credit_rows(tokens, advantages, rewards, k=6) == [4, 3, 9, 10, 0, 6]
    assert pick_credit_rows(tokens, advantages, rewards, k=8) == [4, 3, 9, 10, 0, 6, 1, 2]
    # responses without tokens are never shown; one advantage per response is allowed
    empty = [[] if i == 4 else t for i, t in enumerate(tokens)]
    scalars = [0.5] * 12
    assert pick_credit_rows(empty, scalars, rewards, k=2) == [5, 3]


def test_pick_credit_rows_checks_its_inputs():
    import pytest

    tokens, advantages, rewards = group_batch()
    with pytest.raises(ValueError, match="11 samples, 12 advantages, 12 rewards"):
        pick_credit_rows(tokens[:-1], advantages, rewards)
    with pytest.raises(ValueError, match="sample 2 has 3 tokens but 2 advantages"):
        pick_credit_rows(tokens, advantages[:2] + [torch.zeros(2)] + advantages[3:], rewards)
    with pytest.raises(ValueError, match="pass each sample's group"):
        pick_credit_rows(tokens, advantages, rewards.flatten().tolist())
