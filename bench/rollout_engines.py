"""Rollout engines side by side: transformers `generate` vs vLLM on the same model and prompts.

    python bench/rollout_engines.py                        # the quickstart's tiny model and batch
    python bench/rollout_engines.py --model-dir DIR        # any local HF model directory

Prints, per engine, start-up time and the median time of one rollout batch
(prompts x samples, the quickstart's shape by default) and one weight push,
and the ratio of each to the transformers engine measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def measure(engine_name: str, model_dir: str, prompts, args) -> dict:
    from rlpost.config.sections import RolloutConfig
    from rlpost.workers.rollout import make_engine

    cfg = RolloutConfig(engine=engine_name)
    t = time.perf_counter()
    engine = make_engine(model_dir, cfg, "float32", seed=0)
    start = time.perf_counter() - t
    engine.generate(prompts, args.n, 1.0, 1.0, args.max_new_tokens, seed=0)  # warm-up call
    gen_times, tokens = [], 0
    for i in range(args.repeats):
        t = time.perf_counter()
        out = engine.generate(prompts, args.n, 1.0, 1.0, args.max_new_tokens, seed=i + 1)
        gen_times.append(time.perf_counter() - t)
        tokens = sum(len(c.ids) for group in out for c in group)
    from rlpost.model.load import load_model

    weights = load_model(model_dir).state_dict()
    sync_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        engine.update_weights(weights)
        sync_times.append(time.perf_counter() - t)
    engine.close()
    gen = statistics.median(gen_times)
    return {
        "start": start,
        "generate": gen,
        "tokens_per_s": tokens / gen,
        "sync": statistics.median(sync_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", help="a local HF model directory (default: the quickstart's tiny model)"
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from rlpost.jobs.preflight import load_config
    from rlpost.model.load import load_tokenizer, materialise_initial_model
    from rlpost.rewards import build_task

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    task = build_task(cfg.task.name, cfg.task.args)
    model_dir = args.model_dir or str(
        materialise_initial_model(
            cfg.model, task.alphabet, seed=0, out_dir=Path(tempfile.mkdtemp()) / "model"
        )
    )
    tok = load_tokenizer(model_dir)
    prompts = [
        [tok.bos_token_id] + tok.encode(p.prompt, add_special_tokens=False)
        for p in task.problems(args.prompts, seed=0)
    ]

    results = {name: measure(name, model_dir, prompts, args) for name in ("hf", "vllm")}
    base = results["hf"]
    print(
        f"\nrollout batch: {args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens; "
        f"median of {args.repeats}"
    )
    print(
        f"{'engine':8} {'start s':>8} {'batch s':>9} {'tok/s':>8} {'sync s':>8} "
        f"{'batch vs hf':>12} {'sync vs hf':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:8} {r['start']:8.1f} {r['generate']:9.4f} {r['tokens_per_s']:8.0f} {r['sync']:8.4f} "
            f"{r['generate'] / base['generate']:11.2f}x {r['sync'] / base['sync']:10.2f}x"
        )


if __name__ == "__main__":
    main()
