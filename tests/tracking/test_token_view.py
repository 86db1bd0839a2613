"""The token-weight view (rlpost/tracking/token_view.py): every token in the HTML, escaped, with its
weight; shading monotone in the weight on one scale (1, or the largest weight above 1); a
PNG of the same rows; and `rlpost dpo` writing both for cdpo and sparsepo runs."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from rlpost.cli import main
from rlpost.tracking.token_view import HIGH, LOW, WeightedTokens, visible, write_token_view
from tests.run_helpers import ROOT, only_run_dir, read_metrics
from tests.runs.test_offline_runs import write_data

NAME = 'critical "w" <t>'
ROWS = [
    WeightedTokens(
        "pair 3 (held out)",
        "What is <b>2+3</b>?\nThink & answer.",
        ["The", " answer", " is", "\n", "<b>", "6", "&amp;", "\t", "", "</s>"],
        [0.0, 0.1, 0.5, 1.0, 0.3, 0.9, 0.25, 0.7, 0.4, 0.05],
        chosen="The answer is 5",
    ),
    WeightedTokens(
        "pair 5 (held out)", "p" * 250, [f" tok{i}" for i in range(60)], [i / 59 for i in range(60)]
    ),
]


class Tokens(HTMLParser):
    """(text, title, rgb) of every token span, in order."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok":
            rgb = tuple(
                int(v)
                for v in re.fullmatch(r"background: rgb\((\d+), (\d+), (\d+)\)", attrs["style"]).groups()
            )
            self._open = ["", attrs["title"], rgb]

    def handle_data(self, data):
        if self._open is not None:
            self._open[0] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None


def parse(page: str) -> list[tuple[str, str, tuple[int, int, int]]]:
    parser = Tokens()
    parser.feed(page)
    return parser.spans


def test_html_has_every_token_escaped_with_its_weight(tmp_path):
    page_path, _ = write_token_view(tmp_path, ROWS, "a <title>", NAME)
    page = page_path.read_text(encoding="utf-8")
    spans = parse(page)
    want = [(visible(t), f"{NAME}: {w:.4g}") for row in ROWS for t, w in zip(row.tokens, row.weights)]
    assert [(text, title) for text, title, _ in spans] == want
    # markup in tokens, prompt, weight name and title is text, never tags
    assert "<b>" not in page and "<t>" not in page and "<title>a <title>" not in page
    assert "&lt;b&gt;" in page and "&amp;amp;" in page and "&lt;title&gt;" in page
    assert 'title="critical &quot;w&quot; &lt;t&gt;: 0.9"' in page
    # whitespace made visible: a line break is ↵ and breaks the line, a tab ⇥, nothing ∅
    assert [visible(t) for t in ("\n", "\t", "", " is")] == ["↵", "⇥", "∅", " is"]
    assert '">↵</span><br>' in page
    assert "What is &lt;b&gt;2+3&lt;/b&gt;?\nThink &amp; answer." in page and "The answer is 5" in page
    assert page.count("<section>") == 2


def test_shading_is_monotone_in_the_weight_on_one_scale(tmp_path):
    page_path, _ = write_token_view(tmp_path, ROWS, "t", "w")
    spans = parse(page_path.read_text(encoding="utf-8"))
    weights = [w for row in ROWS for w in row.weights]
    by_weight = sorted(zip(weights, [rgb for _, _, rgb in spans]))
    assert by_weight[0] == (0.0, LOW) and by_weight[-1] == (1.0, HIGH)
    for (w0, a), (w1, b) in zip(by_weight, by_weight[1:]):
        assert all(x >= y for x, y in zip(a, b))  # every channel darkens towards HIGH
        assert sum(a) > sum(b) or w1 - w0 < 0.01, (w0, w1)  # 8-bit colour: steps of ~1/235
    # a weight above 1 (learned SparsePO masks) tops the scale instead of 1; the legend says so
    big = [WeightedTokens("r", "p", ["a", "b", "c"], [1.0, 2.5, 0.0])]
    page = write_token_view(tmp_path, big, "t", "m^u", stem="big")[0].read_text(encoding="utf-8")
    assert [rgb for _, _, rgb in parse(page)] == [
        tuple(round(lo + (hi - lo) / 2.5) for lo, hi in zip(LOW, HIGH)),
        HIGH,
        LOW,
    ]
    assert "orange at 2.5, the largest weight here (some exceed 1)" in page
    assert "some exceed 1" not in write_token_view(tmp_path, ROWS, "t", "w", stem="small")[0].read_text()


def test_png_is_an_image_of_the_rows(tmp_path):
    _, image_path = write_token_view(tmp_path, ROWS, "a title with $math$", NAME)
    one = write_token_view(tmp_path, ROWS[:1], "t", NAME, stem="one")[1]
    with Image.open(image_path) as image:
        width, height = image.size
        assert image.format == "PNG" and 800 < width < 1200 and 300 < height < 2000
        pixels = image.convert("RGB")
        colours = {pixels.getpixel((x, y)) for x in range(0, width, 3) for y in range(0, height, 3)}
    assert any(abs(r - HIGH[0]) + abs(g - HIGH[1]) + abs(b - HIGH[2]) < 12 for r, g, b in colours)
    with Image.open(one) as small:  # height follows the lines drawn, width does not
        assert small.size[0] == width and small.size[1] < height - 100
    with pytest.raises(ValueError, match="pair 3 .*: 10 tokens but 9 weights"):
        write_token_view(
            tmp_path,
            [WeightedTokens("pair 3 (held out)", "p", ROWS[0].tokens, ROWS[0].weights[:-1])],
            "t",
            "w",
        )


@pytest.mark.parametrize(
    "overrides",
    [["algorithm.loss=cdpo"], ["algorithm.loss=sparsepo", "algorithm.masks=common"]],
    ids=["cdpo", "sparsepo-common"],
)
def test_dpo_run_writes_the_view(tmp_path, capsys, overrides):
    """One step of the tiny config; the view shows the first 6 of the 8 held-out pairs, their
    rejected responses token by token (the character tokenizer: one token per character,
    then EOS) with the data's critical weights (cdpo) or the learners' masks (sparsepo)."""
    _, pairs = write_data(tmp_path)
    code = main(
        [
            "dpo",
            str(ROOT / "tests" / "configs" / "dpo_tiny.yaml"),
            f"data.path={pairs}",
            "steps=1",
            f"output_dir={tmp_path / 'runs'}",
            *overrides,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    run = only_run_dir(tmp_path / "runs")
    page, image = run / "token_weights.html", run / "token_weights.png"
    assert f"token weights: {page} (token_weights.png)" in out.splitlines()
    with Image.open(image) as png:
        assert png.format == "PNG" and png.size[0] > 800
    text = page.read_text(encoding="utf-8")
    sections = text.split("<section>")[1:]
    assert len(sections) == 6 and all(re.match(r"<h2>pair \d+ \(held out\)</h2>", s) for s in sections)
    for section in sections:
        tokens = [t for t, _, _ in parse(section)]
        assert tokens[-1] == "</s>" and all(t in "-0123456789" for t in tokens[:-1]), tokens
    spans = parse(text)
    weights = [float(title.rsplit(": ", 1)[1]) for _, title, _ in spans]
    if "algorithm.loss=cdpo" in overrides:
        # write_data: weight 1 on the characters of the wrong sum, 0.1 on the EOS
        assert weights == [0.1 if t == "</s>" else 1.0 for t, _, _ in spans]
    else:
        assert "SparsePO mask m^u (common)" in text and min(weights) >= 0 and max(weights) > 0
        assert "mask_u/mean" in read_metrics(run)[1]
