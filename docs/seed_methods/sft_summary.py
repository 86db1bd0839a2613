"""The tables of docs/seed_methods.md, "ssToken against plain SFT", from the runs of
docs/seed_methods/run_sft.sh.

    python docs/seed_methods/sft_summary.py OUT_DIR SEED [SEED ...]

reads OUT_DIR/seedS/{sft,sstoken}/*/metrics.jsonl (training), OUT_DIR/seedS/eval/ARM-eval-*/
metrics.jsonl (`rlpost eval`) and OUT_DIR/seedS/ARM.wall_s, and prints per seed a table of
both arms, then the seed-paired differences (ssToken - SFT): mean, sample std, and how many
seeds ssToken is above.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from rlpost.rewards.tasks.arithmetic import add_without_carry

ARMS = ("sft", "sstoken")
TAIL = 100  # the "final" training numbers: the mean over the last TAIL steps


def one(base: Path, pattern: str) -> Path:
    found = sorted(base.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {base / pattern}, found {len(found)}")
    return found[0]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def arm_numbers(out: Path, seed: int, arm: str) -> dict[str, float]:
    seed_dir = out / f"seed{seed}"
    train = [r for r in read(one(seed_dir, f"{arm}/*/metrics.jsonl")) if r["step"] > 0]
    evaluation = read(one(seed_dir, f"eval/{arm}-eval-*/metrics.jsonl"))[-1]
    tail = train[-TAIL:]

    def mean(key: str, rows=tail) -> float:
        values = [r[key] for r in rows if key in r]
        return statistics.fmean(values) if values else float("nan")

    short, no_carry = greedy_shapes(out, seed, arm)
    return {
        "greedy": evaluation["eval/accuracy_greedy"],
        "greedy_short": short,
        "greedy_no_carry": no_carry,
        "sampled": evaluation["eval/accuracy_sampled"],
        "nll": mean("nll"),
        "nll_selected": mean("nll_selected"),
        "selected_frac": mean("sstoken/selected_frac", train),
        "rel_mean": mean("sstoken/rel_mean"),
        "attn_mean": mean("sstoken/attn_mean"),
        "steps": len(train),
        "time_per_step": mean("time/step", train),
        "wall_s": float((out / f"seed{seed}" / f"{arm}.wall_s").read_text()),
        "eval_wall_s": float((out / f"seed{seed}" / f"{arm}.eval_wall_s").read_text()),
    }


def greedy_shapes(out: Path, seed: int, arm: str) -> tuple[float, float]:
    """Of the greedy completions: the fraction that is the correct answer less its last digit,
    and the fraction that is the teacher's carry-free answer (when it differs) in full."""
    rows = read(one(out / f"seed{seed}", f"eval/{arm}-eval-*/eval/generations.jsonl"))
    greedy = [r for r in rows if r["mode"] == "greedy"]
    short = sum(r["response"].strip() == r["answer"][:-1] for r in greedy)
    no_carry = 0
    for r in greedy:
        a, b = map(int, r["prompt"][:-1].split("+"))
        wrong = str(add_without_carry(a, b))
        no_carry += wrong != r["answer"] and r["response"].strip() == wrong
    return short / len(greedy), no_carry / len(greedy)


def fmt(value: float, digits: int = 3) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN: the arm has no such metric


def main() -> None:
    out, seeds = Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
    numbers = {(s, a): arm_numbers(out, s, a) for s in seeds for a in ARMS}
    for s in seeds:
        print(f"\nSeed {s}:\n")
        print(
            "| arm | greedy acc | sampled acc (n 4) | greedy = answer less last digit "
            "| greedy = carry-free answer | train NLL | NLL selected | selected frac "
            "| REL mean | Attn mean | steps | s / step | run wall s | eval wall s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for a in ARMS:
            n = numbers[s, a]
            print(
                f"| {a} | {fmt(n['greedy'])} | {fmt(n['sampled'])} | {fmt(n['greedy_short'])} "
                f"| {fmt(n['greedy_no_carry'])} | {fmt(n['nll'], 4)} "
                f"| {fmt(n['nll_selected'], 4)} | {fmt(n['selected_frac'])} | {fmt(n['rel_mean'])} "
                f"| {fmt(n['attn_mean'])} | {n['steps']} | {fmt(n['time_per_step'])} "
                f"| {n['wall_s']:.0f} | {n['eval_wall_s']:.0f} |"
            )
    print(
        f"\nssToken - SFT, paired by seed ({len(seeds)} seeds): mean ± sample std, "
        "and the seeds where ssToken is higher:\n"
    )
    print("| metric | per seed | mean ± std | ssToken higher |")
    print("|---|---|---|---|")
    for key in ("greedy", "sampled", "nll"):
        diffs = [numbers[s, "sstoken"][key] - numbers[s, "sft"][key] for s in seeds]
        std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
        above = sum(d > 0 for d in diffs)
        print(
            f"| {key} | {per_seed} | {statistics.fmean(diffs):+.4f} ± {fmt(std, 4)} | {above}/{len(seeds)} |"
        )


if __name__ == "__main__":
    main()
