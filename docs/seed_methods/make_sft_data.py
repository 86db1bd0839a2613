"""The quickstart's supervised warm-up as an `rlpost sft` data set (docs/seed_methods.md,
"ssToken against plain SFT").

    python docs/seed_methods/make_sft_data.py --seed S --out FILE [--config configs/quickstart.yaml]

writes FILE (JSONL), one `{"prompt": "23+59=", "completion": "72"}` row per demonstration
(the format of rlpost/data/datasets.py: BOS + prompt, the completion and an EOS), and
FILE with the suffix .meta.json (counts, the fraction of carry problems and of wrong
demonstrations).

The rows are exactly the demonstrations `rlpost train CONFIG seed=S` trains its warm-up on
(rlpost/jobs/session.py, `Session.warmup`): the training problems of the RL job's own
`Session` (task.problems(train_size, seed=S)), and per warm-up step `batch_size` of them
drawn with `rng.sample` followed by one teacher demonstration each, from the one
random.Random(derive_seed(S, "warmup")), for `warmup.steps` steps: 2500 x 64 = 160,000
rows in the warm-up's order. `rlpost sft` with `batch_size` 64, 2500 steps and no held-out
rows reads them once, in its own seeded shuffle: the same multiset of (problem,
demonstration) as the warm-up, in another order.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from rlpost.data.stream import derive_seed
from rlpost.jobs.preflight import load_config
from rlpost.jobs.session import Session
from rlpost.rewards.tasks.arithmetic import add_without_carry


def warmup_rows(cfg, session: Session) -> list[dict[str, str]]:
    """The warm-up's demonstrations in its order: the same calls on the same generator as
    `Session.warmup` (the sample first, then one demonstration per drawn problem)."""
    rng = random.Random(derive_seed(cfg.seed, "warmup"))
    rows = []
    for _ in range(cfg.warmup.steps):
        for p in rng.sample(session.train_problems, cfg.warmup.batch_size):
            rows.append({"prompt": p.prompt, "completion": session.task.demonstration(p, rng)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"seed={args.seed}"])
    with tempfile.TemporaryDirectory() as scratch:  # Session starts nothing in its constructor
        session = Session(cfg, Path(scratch))
    rows = warmup_rows(cfg, session)
    answers = {p.prompt: p for p in session.train_problems}
    held_out = {p.prompt for s in session.eval_sets for p in s.problems}
    if held_out & answers.keys():
        raise SystemExit("an eval problem is among the training problems")
    wrong = sum(r["completion"] != answers[r["prompt"]].answer for r in rows)
    carry = sum(add_without_carry(p.meta["a"], p.meta["b"]) != int(p.answer) for p in session.train_problems)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    meta = {
        "config": args.config,
        "seed": cfg.seed,
        "rows": len(rows),
        "warmup_steps": cfg.warmup.steps,
        "batch_size": cfg.warmup.batch_size,
        "train_problems": len(session.train_problems),
        "distinct_train_prompts": len(answers),
        "carry_problem_frac": carry / len(session.train_problems),
        "wrong_demonstration_frac": wrong / len(rows),
        "distinct_eval_prompts": len(held_out),
    }
    args.out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
