"""Per-token weights a person can look at, as an HTML page and a PNG.

Each rejected response is drawn token by token, every token shaded by its weight (cDPO's
critical weights, SparsePO's masks); the HTML page is self-contained.

One colour scale for both: linear from white at 0 to orange at the top of the scale, which
is 1, or the largest weight when a weight exceeds 1 (learned SparsePO masks are not bounded);
the legend and the colorbar say which. Signed weights (`signed=True`: RL advantages,
rlpost/tracking/credit_view.py) take a diverging scale instead: blue at -top, white at 0,
red at +top, with top the largest |weight| in the view (1 when all are 0).

Whitespace is made visible: a line break as ↵ (followed by a real one), a tab as ⇥, a
carriage return as ␍; spaces stay spaces inside the shaded box, a visible gap; a token that
decodes to nothing as ∅.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path

LOW, HIGH = (255, 255, 255), (230, 110, 20)  # RGB at weight 0 and at the top of the scale
NEGATIVE, POSITIVE = (40, 90, 210), (210, 35, 30)  # signed scale: RGB at -top and at +top
_SYMBOLS = {"\n": "↵", "\t": "⇥", "\r": "␍"}


@dataclass
class WeightedTokens:
    label: str  # e.g. "pair 3 (held out)"
    prompt: str | None  # None: not shown
    tokens: list[str]  # the rejected response, one string per token, as decoded
    weights: list[float]  # one per token
    chosen: str | None = None  # the chosen response's text, shown for context


def visible(token: str) -> str:
    """The token as drawn: whitespace other than spaces as symbols, nothing as ∅."""
    return "".join(_SYMBOLS.get(c, c) for c in token) or "∅"


def scale_top(rows: list[WeightedTokens]) -> float:
    """The weight drawn at full colour: 1, or the largest weight above 1."""
    return max([1.0] + [w for row in rows for w in row.weights])


def signed_top(rows: list[WeightedTokens]) -> float:
    """The |weight| drawn at full colour on the signed scale: the largest, or 1 when all are 0."""
    return max((abs(w) for row in rows for w in row.weights), default=0.0) or 1.0


def shade(weight: float, top: float, signed: bool = False) -> tuple[int, int, int]:
    """RGB of a token of `weight`: linear from LOW at 0 to HIGH at `top`, clipped; signed,
    from LOW at 0 to POSITIVE at +top or NEGATIVE at -top."""
    if not signed:
        f = min(max(weight / top, 0.0), 1.0)
        return tuple(round(lo + f * (hi - lo)) for lo, hi in zip(LOW, HIGH))
    f = min(abs(weight) / top, 1.0)
    end = POSITIVE if weight >= 0 else NEGATIVE
    return tuple(round(lo + f * (hi - lo)) for lo, hi in zip(LOW, end))


def _scale_text(weight_name: str, top: float, signed: bool = False) -> str:
    if signed:
        largest = f"the largest |{weight_name}| here"
        return f"{weight_name}, blue at {-top:.4g}, white at 0, red at {top:.4g} ({largest})"
    above = ", the largest weight here (some exceed 1)" if top > 1 else ""
    return f"{weight_name}, linear from white at 0 to orange at {top:.4g}{above}"


@dataclass
class _Scale:
    top: float  # the |weight| at full colour
    signed: bool
    tokens_name: str  # what the shaded tokens are called: "rejected", "response"


def write_token_view(
    out_dir: Path,
    rows: list[WeightedTokens],
    title: str,
    weight_name: str,
    stem: str = "token_weights",
    signed: bool = False,
    tokens_name: str = "rejected",
) -> tuple[Path, Path]:
    """Writes out_dir/<stem>.html and out_dir/<stem>.png; returns their paths. `signed`: the
    diverging scale for weights of either sign; `tokens_name` names the shaded response."""
    if not rows:
        raise ValueError("write_token_view: no rows to show")
    for row in rows:
        if len(row.tokens) != len(row.weights):
            raise ValueError(f"{row.label}: {len(row.tokens)} tokens but {len(row.weights)} weights")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = _Scale(signed_top(rows) if signed else scale_top(rows), signed, tokens_name)
    page, image = out_dir / f"{stem}.html", out_dir / f"{stem}.png"
    page.write_text(_html(rows, title, weight_name, scale), encoding="utf-8")
    _png(image, rows, title, weight_name, scale)
    return page, image


# ----- HTML ----------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 60em; }
.legend { color: #444; }
.bar { display: inline-block; width: 12em; height: 0.9em; vertical-align: middle;
       border: 1px solid #bbb; margin: 0 0.4em; }
section { border-top: 1px solid #ddd; padding: 0.5em 0; }
h2 { font-size: 1em; margin: 0.4em 0; }
.name { color: #666; font-size: 0.85em; }
.text { white-space: pre-wrap; font-family: monospace; margin: 0.2em 0 0.6em; }
.tokens { font-family: monospace; line-height: 1.9; }
.tok { white-space: pre; border: 1px solid #ddd; padding: 0.1em 0; }
"""


def _token_html(token: str, weight: float, weight_name: str, scale: _Scale) -> str:
    r, g, b = shade(weight, scale.top, scale.signed)
    tip = html.escape(f"{weight_name}: {weight:.4g}")
    span = (
        f'<span class="tok" style="background: rgb({r}, {g}, {b})" title="{tip}">'
        f"{html.escape(visible(token))}</span>"
    )
    return span + ("<br>" if "\n" in token else "")


def _html(rows: list[WeightedTokens], title: str, weight_name: str, scale: _Scale) -> str:
    esc = html.escape
    top, name = scale.top, esc(scale.tokens_name)
    low, stops = (
        (f"{-top:.4g}", f"rgb{NEGATIVE}, rgb{LOW}, rgb{POSITIVE}")
        if scale.signed
        else ("0", f"rgb{LOW}, rgb{HIGH}")
    )
    legend = (
        f'<p class="legend">Background of each {name} token: its '
        f'{_scale_text(esc(weight_name), top, scale.signed)}. {low}<span class="bar" style="background: '
        f'linear-gradient(to right, {stops})"></span>{top:.4g}<br>Hover over a '
        f"token for its weight. ↵ marks a line break, ⇥ a tab; a space is a gap in the "
        f"shading.</p>"
    )
    parts = [
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        legend,
    ]
    for row in rows:
        parts.append(f"<section><h2>{esc(row.label)}</h2>")
        if row.prompt is not None:
            parts.append(f'<div class="name">prompt</div><div class="text">{esc(row.prompt)}</div>')
        if row.chosen is not None:
            parts.append(f'<div class="name">chosen</div><div class="text">{esc(row.chosen)}</div>')
        tokens = "".join(_token_html(t, w, weight_name, scale) for t, w in zip(row.tokens, row.weights))
        parts.append(f'<div class="name">{name}</div><div class="tokens">{tokens}</div></section>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----- PNG -----------------------------------------------------------------------------------

WIDTH = 100  # characters per line
TEXT_LINES = 4  # lines of a prompt or chosen response at most (the HTML has them whole)
FONT_PT, LINE_PT = 9.0, 14.0
CHAR_IN = 0.602 * FONT_PT / 72  # advance of DejaVu Sans Mono


def _text_lines(name: str, text: str) -> list[str]:
    lines = [
        piece for line in f"{name}: {text}".split("\n") for piece in (textwrap.wrap(line, WIDTH) or [""])
    ]
    if len(lines) > TEXT_LINES:
        lines = lines[: TEXT_LINES - 1] + [lines[TEXT_LINES - 1][: WIDTH - 1] + "…"]
    return lines


def _layout(rows: list[WeightedTokens], tokens_name: str = "rejected") -> list[tuple[str, object]]:
    """Lines to draw: ("title", text), ("text", text) or ("tokens", [(x, text, weight)])."""
    lines: list[tuple[str, object]] = []
    for row in rows:
        lines.append(("title", row.label))
        if row.prompt is not None:
            lines += [("text", t) for t in _text_lines("prompt", row.prompt)]
        if row.chosen is not None:
            lines += [("text", t) for t in _text_lines("chosen", row.chosen)]
        lines.append(("text", f"{tokens_name}:"))
        boxes, x = [], 0.0
        for token, weight in zip(row.tokens, row.weights):
            text = visible(token)
            if boxes and x + len(text) > WIDTH:
                lines.append(("tokens", boxes))
                boxes, x = [], 0.0
            boxes.append((x, text, weight))
            x += len(text) + 0.3
            if "\n" in token:
                lines.append(("tokens", boxes))
                boxes, x = [], 0.0
        if boxes:
            lines.append(("tokens", boxes))
        lines.append(("text", ""))
    return lines


def _png(path: Path, rows: list[WeightedTokens], title: str, weight_name: str, scale: _Scale) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure  # Agg, without touching pyplot's global backend
    from matplotlib.patches import Rectangle

    lines, top = _layout(rows, scale.tokens_name), scale.top
    line_in, margin_in, head_in, foot_in = LINE_PT / 72, 0.3, 0.45, 0.75
    width_in = WIDTH * CHAR_IN + 2 * margin_in
    height_in = head_in + len(lines) * line_in + foot_in
    fig = Figure(figsize=(width_in, height_in), dpi=110)
    fig.text(
        margin_in / width_in,
        1 - 0.3 / height_in,
        title,
        fontsize=11,
        weight="bold",
        va="center",
        parse_math=False,
    )
    ax = fig.add_axes(
        (
            margin_in / width_in,
            foot_in / height_in,
            WIDTH * CHAR_IN / width_in,
            len(lines) * line_in / height_in,
        )
    )
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    colours = (NEGATIVE, LOW, POSITIVE) if scale.signed else (LOW, HIGH)
    cmap = LinearSegmentedColormap.from_list("token_weight", [[c / 255 for c in rgb] for rgb in colours])
    norm = Normalize(-top if scale.signed else 0, top)
    text = dict(fontsize=FONT_PT, family="monospace", va="center", parse_math=False)
    for y, (kind, content) in enumerate(lines):
        if kind == "tokens":
            for x, token, weight in content:
                ax.add_patch(
                    Rectangle(
                        (x, y + 0.1),
                        len(token),
                        0.8,
                        facecolor=cmap(norm(weight)),
                        edgecolor="0.8",
                        linewidth=0.4,
                    )
                )
                ax.text(x, y + 0.5, token, **text)
        else:
            ax.text(0, y + 0.5, content, **text, **({"weight": "bold"} if kind == "title" else {}))
    cax = fig.add_axes((margin_in / width_in, 0.3 / height_in, 0.45, 0.12 / height_in))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cax.tick_params(labelsize=7)
    fig.text(
        margin_in / width_in,
        0.47 / height_in,
        _scale_text(weight_name, top, scale.signed),
        fontsize=8,
        parse_math=False,
    )
    fig.savefig(path)
