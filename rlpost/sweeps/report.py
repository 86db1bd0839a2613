"""`rlpost report SWEEP_DIR`: a sweep's arms compared over seeds.

Writes SWEEP_DIR/report/:
  report.md    the final metrics per arm (mean ± standard deviation over seeds),
               each arm's overrides, and the plots
  <metric>.png per arm the mean over seeds at every step, with a band of ± one
               standard deviation (reward, accuracy, entropy, length, clip fractions)

Standard deviations are sample ones (n - 1), as in docs/ablations.md. Runs that
have not finished are left out and listed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlpost.sweeps.manifest import finished, read_manifest
from rlpost.sweeps.sweep import yaml_text
from rlpost.tracking.tracker import METRICS_FILE, read_metrics

Points = list[tuple[float, float]]  # (step, value), by step


def _rl(points: Points) -> list[float]:
    return [y for step, y in points if step > 0]


def _mean_of_last_10(points: Points) -> float | None:
    rl = _rl(points)[-10:]
    return statistics.mean(rl) if rl else None


def _mean_over_rl_steps(points: Points) -> float | None:
    rl = _rl(points)
    return statistics.mean(rl) if rl else None


# (column title, metric, a run's value from its points, number format)
COLUMNS: list[tuple[str, str, Callable[[Points], float | None], str]] = [
    ("greedy acc. before", "eval/accuracy_greedy", lambda p: p[0][1], "{:.3f}"),
    ("greedy acc. after", "eval/accuracy_greedy", lambda p: p[-1][1], "{:.3f}"),
    ("sampled acc. after", "eval/accuracy_sampled", lambda p: p[-1][1], "{:.3f}"),
    ("reward (last 10 steps)", "reward/mean", _mean_of_last_10, "{:.3f}"),
    ("reward (run mean)", "reward/mean", _mean_over_rl_steps, "{:.3f}"),
    ("entropy (last 10 steps)", "rollout_entropy", _mean_of_last_10, "{:.3f}"),
    ("response length (last 10 steps)", "response_length/mean", _mean_of_last_10, "{:.3f}"),
    ("length, correct (run mean)", "response_length/correct", _mean_over_rl_steps, "{:.1f}"),
    ("length, incorrect (run mean)", "response_length/incorrect", _mean_over_rl_steps, "{:.1f}"),
    (
        "in-group length gap, incorrect - correct (run mean)",
        "response_length/incorrect_minus_correct",
        _mean_over_rl_steps,
        "{:.1f}",
    ),
    ("clip frac. low (run mean)", "clip_frac_low", _mean_over_rl_steps, "{:.4f}"),
    ("clip frac. high (run mean)", "clip_frac_high", _mean_over_rl_steps, "{:.4f}"),
    ("BA positive side weight (run mean)", "agg/positive_side_weight", _mean_over_rl_steps, "{:.3f}"),
    ("BA negative side weight (run mean)", "agg/negative_side_weight", _mean_over_rl_steps, "{:.3f}"),
    # credit beyond the outcome (docs/algorithms.md section 5): its cost and its models' fit
    ("critic explained variance (run mean)", "critic/explained_variance", _mean_over_rl_steps, "{:.3f}"),
    ("PRM accuracy (run mean)", "prm/accuracy", _mean_over_rl_steps, "{:.3f}"),
    ("wall time per step, s (run mean)", "time/step", _mean_over_rl_steps, "{:.1f}"),
    ("of which credit, s (run mean)", "time/credit", _mean_over_rl_steps, "{:.1f}"),
]

# (title, metric, a run's value from its points): the paired comparison with a baseline
DELTAS = [c[:3] for c in COLUMNS if c[0] in ("greedy acc. after", "sampled acc. after", "reward (run mean)")]

# (file stem, title, y label, metric)
PLOTS: list[tuple[str, str, str, str]] = [
    ("reward", "Reward", "mean reward", "reward/mean"),
    ("accuracy", "Greedy accuracy (held-out problems)", "accuracy", "eval/accuracy_greedy"),
    ("accuracy_sampled", "Sampled accuracy (held-out problems)", "accuracy", "eval/accuracy_sampled"),
    ("entropy", "Rollout entropy", "nats / token", "rollout_entropy"),
    ("response_length", "Response length", "tokens", "response_length/mean"),
    ("clip_frac_low", "Clip fraction, low side (A < 0)", "fraction of tokens", "clip_frac_low"),
    ("clip_frac_high", "Clip fraction, high side (A > 0)", "fraction of tokens", "clip_frac_high"),
]


@dataclass
class RunMetrics:
    arm: str
    seed: int
    rows: list[dict]

    def points(self, metric: str) -> Points:
        by_step: dict[float, float] = {}
        for row in self.rows:
            y = row.get(metric)
            if isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y):
                by_step[row["step"]] = float(y)  # the last value logged for a step wins
        return sorted(by_step.items())


def load_runs(sweep_dir: Path) -> tuple[dict, list[RunMetrics], list[str]]:
    """The manifest, the finished runs' metrics, and the ids of unfinished runs."""
    manifest = read_manifest(sweep_dir)
    runs, missing = [], []
    for r in manifest["runs"]:
        done = finished(sweep_dir, r["id"])
        if done is None:
            missing.append(r["id"])
        else:
            rows = read_metrics(Path(sweep_dir) / done["run_dir"] / METRICS_FILE)
            runs.append(RunMetrics(r["arm"], r["seed"], rows))
    return manifest, runs, missing


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def table(arms: list[str], runs: list[RunMetrics]) -> list[list[str]]:
    """Header and one row per arm: its seeds, then 'mean ± std' per column with data."""
    cells: dict[str, list[str]] = {arm: [] for arm in arms}
    header = ["arm", "seeds"]
    for title, metric, value_of, fmt in COLUMNS:
        column = {}
        for arm in arms:
            values = [value_of(p) for r in runs if r.arm == arm and (p := r.points(metric))]
            column[arm] = [v for v in values if v is not None]
        if not any(column.values()):
            continue
        header.append(title)
        for arm, values in column.items():
            if not values:
                cells[arm].append("–")
                continue
            mean, std = mean_std(values)
            cells[arm].append(fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else ""))
    rows = [header]
    for arm in arms:
        seeds = ",".join(str(r.seed) for r in runs if r.arm == arm)
        rows.append([arm, seeds or "–", *cells[arm]])
    return rows


def curve(runs: list[RunMetrics], metric: str) -> tuple[list[float], list[float], list[float]]:
    """Steps, the mean over runs and the standard deviation (0 where one run has the step)."""
    by_step: dict[float, list[float]] = {}
    for r in runs:
        for step, y in r.points(metric):
            by_step.setdefault(step, []).append(y)
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [s or 0.0 for _, s in stats]


def _axes():
    from matplotlib.figure import Figure  # Agg, without touching pyplot's global backend

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    return fig, fig.subplots()


def _save(fig, ax, path: Path, title: str, ylabel: str, **legend) -> None:
    """Title, labels, integer steps, grid and legend, then the PNG."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", **legend)
    fig.savefig(path, format="png")


def plot(path: Path, title: str, ylabel: str, metric: str, arms: list[str], runs: list[RunMetrics]) -> bool:
    """One PNG: a mean line and a ± std band per arm. False when no run has the metric."""
    fig, ax = _axes()
    drawn = False
    for arm in arms:
        arm_runs = [r for r in runs if r.arm == arm]
        steps, mean, std = curve(arm_runs, metric)
        if not steps:
            continue
        drawn = True
        marker = "o" if len(steps) <= 30 else None
        (line,) = ax.plot(
            steps, mean, marker=marker, markersize=4, linewidth=1.5, label=f"{arm} (n={len(arm_runs)})"
        )
        ax.fill_between(
            steps,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    if not drawn:
        return False
    _save(fig, ax, path, f"{title}: mean over seeds, band ± 1 std", ylabel, fontsize="small")
    return True


def plot_length_by_outcome(path: Path, arms: list[str], runs: list[RunMetrics]) -> bool:
    """One PNG: per arm, the mean length of correct (solid) and incorrect (dashed)
    responses over training, each the mean over seeds."""
    fig, ax = _axes()
    drawn = False
    for i, arm in enumerate(arms):
        arm_runs = [r for r in runs if r.arm == arm]
        color = f"C{i % 10}"
        for metric, style, outcome in (("correct", "-", "correct"), ("incorrect", "--", "incorrect")):
            steps, mean, _ = curve(arm_runs, f"response_length/{metric}")
            if steps:
                drawn = True
                ax.plot(steps, mean, style, color=color, linewidth=1.5, label=f"{arm}: {outcome}")
    if not drawn:
        return False
    title = "Response length of correct (solid) and incorrect (dashed) responses, mean over seeds"
    _save(fig, ax, path, title, "tokens", fontsize="x-small", ncol=2)
    return True


def paired(baselines: dict[str, str], runs: list[RunMetrics]) -> list[list[str]]:
    """Header and a row per compared arm: for each DELTAS metric, the arm's value minus
    its baseline's on the same seed, mean ± std over the seeds both finished, and how
    many of those seeds put the arm above its baseline."""
    by = {(r.arm, r.seed): r for r in runs}
    rows = [["arm", "baseline", *(f"Δ {title}" for title, _, _ in DELTAS)]]
    for arm, base in baselines.items():
        row = [arm, base]
        for _, metric, value_of in DELTAS:
            diffs = []
            for (a, seed), r in by.items():
                b = by.get((base, seed))
                if a != arm or b is None or not r.points(metric) or not b.points(metric):
                    continue
                x, y = value_of(r.points(metric)), value_of(b.points(metric))
                if x is not None and y is not None:
                    diffs.append(x - y)
            if not diffs:
                row.append("–")
                continue
            mean, std = mean_std(diffs)
            above = sum(d > 0 for d in diffs)
            row.append(
                f"{mean:+.3f}" + (f" ± {std:.3f}" if std is not None else "") + f" ({above}/{len(diffs)})"
            )
        rows.append(row)
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _overrides(overrides: dict) -> str:
    return ", ".join(f"`{k}={yaml_text(v)}`" for k, v in overrides.items()) or "(the base config)"


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md and the plots; returns report.md's path."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    manifest, runs, missing = load_runs(sweep_dir)
    arms = list(manifest["arms"])
    seeds = ", ".join(map(str, manifest["seeds"]))
    lines = [
        f"# Sweep `{manifest['name']}`",
        "",
        f"Base config `{manifest['base']}`, {len(arms)} arms x seeds {seeds}: "
        f"{len(runs)} of {len(manifest['runs'])} runs finished"
        + (f" (not finished: {', '.join(missing)})." if missing else "."),
        "",
        "Final metrics, mean ± standard deviation over seeds (sample std, n - 1). "
        "Accuracies are greedy or sampled answers to the held-out problems at the first "
        'and last evaluation; "last 10 steps" averages a run\'s last 10 RL steps, '
        '"run mean" all of them.',
        "",
        markdown_table(table(arms, runs)),
        "",
        "| arm | overrides |",
        "|---|---|",
    ]
    lines += [f"| {arm} | {_overrides(manifest['arms'][arm])} |" for arm in arms]
    if manifest["common"]:
        lines += ["", f"Every run: {_overrides(manifest['common'])}."]
    if manifest.get("baselines"):
        lines += [
            "",
            "## Against the baseline",
            "",
            "Paired by seed (a seed's arms share its warm-up and data): each arm's value "
            "minus its baseline's on the same seed, mean ± standard deviation over seeds, "
            "and in brackets how many seeds put the arm above its baseline.",
            "",
            markdown_table(paired(manifest["baselines"], runs)),
        ]
    lines += [
        "",
        "## Curves",
        "",
        "Per arm, the mean over seeds at each step; the band is ± one standard deviation.",
        "",
    ]
    for stem, title, ylabel, metric in PLOTS:
        if plot(out / f"{stem}.png", title, ylabel, metric, arms, runs):
            lines += [f"![{title}]({stem}.png)", ""]
    if plot_length_by_outcome(out / "length_by_outcome.png", arms, runs):
        lines += ["![Length of correct and incorrect responses](length_by_outcome.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
