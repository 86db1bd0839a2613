"""The `rlpost` command: each subcommand loads and checks its config, then runs one job.

`rlpost train CONFIG [key.sub=value ...]`, `rlpost sweep SWEEP [key.sub=value ...]`,
`rlpost report SWEEP_DIR`, `rlpost sft CONFIG [key.sub=value ...]`,
`rlpost dpo CONFIG [key.sub=value ...]`, `rlpost cdpo CONFIG [key.sub=value ...]`,
`rlpost eval CONFIG model.path=DIR [key.sub=value ...]`"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from rlpost.config.load import parse_override
from rlpost.data.rows import PreferenceDataError
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config


def load_train_config(config: str, overrides: list[str], load=load_config):
    """The config of a new run, or of the run named by `resume=<run dir>` plus the overrides;
    `load(path, overrides)` validates it (RL's `load_config` unless given)."""
    resume = None
    for text in overrides:
        key, value = parse_override(text)
        if key == ["resume"]:
            resume = str(value)
    if resume is None:
        return load(config, overrides)
    saved = Path(resume) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume: {resume} is not a run directory (no config.yaml)")
    rest = [o for o in overrides if parse_override(o)[0] != ["resume"]]
    return load(saved, rest + [f"resume={resume}"])


def quiet_libraries() -> None:
    """Keep the console for rlpost's progress lines. Set before the libraries load;
    Ray workers started from here inherit the environment."""
    for key, value in {
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }.items():
        os.environ.setdefault(key, value)
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed would otherwise warn in every process that it fell back to the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlpost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def job(name: str, text: str) -> None:
        p_job = sub.add_parser(name, help=text)
        p_job.add_argument("config", help="YAML config file")
        p_job.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    job("train", "run a training job from a YAML config")
    job(
        "eval",
        "evaluate a model directory (model.path=DIR) on the config's eval sets: greedy "
        "accuracy, mean@k, pass@k, maj@k per source",
    )
    p_sweep = sub.add_parser(
        "sweep",
        help="run a sweep file's runs one after another "
        "(again: skip the finished ones), then write its report",
    )
    p_sweep.add_argument("sweep", help="sweep file (YAML; see rlpost/sweeps/sweep.py)")
    p_sweep.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")
    p_sweep.add_argument("--name", help="sweep name (directory, W&B group) instead of the file's")
    p_sweep.add_argument(
        "--output-dir",
        help="where the sweep directory goes (default: the file's output_dir, else runs/sweeps)",
    )
    p_sweep.add_argument(
        "--ray-address",
        help="run on this Ray cluster (sets ray.address of every run; 'auto' inside a Ray job)",
    )
    p_sweep.add_argument("--dry-run", action="store_true", help="validate and list the runs")
    p_sweep.add_argument("--no-report", action="store_true", help="do not write the report")
    p_report = sub.add_parser("report", help="plots and a table comparing a sweep's arms")
    p_report.add_argument("sweep_dir", help="a sweep directory (with sweep.json)")
    p_report.add_argument("--out", help="output directory (default: SWEEP_DIR/report)")
    job("sft", "supervised fine-tuning (nll, dft or asft) on a dataset")
    job("dpo", "preference optimisation (dpo, tdpo1, tdpo2, sparsepo, cdpo) on pairs")
    job(
        "cdpo",
        "cDPO's pipeline: sample, verify, contrastive critical tokens, weighted DPO "
        "(again with resume=RUN_DIR: skip finished stages)",
    )
    # Overrides may also come after options (`rlpost sweep S.yaml --name x steps=3`).
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra

    try:
        if args.command == "sweep":
            return sweep_command(args)
        if args.command == "report":
            from rlpost.sweeps.report import write_report

            print(f"report: {write_report(args.sweep_dir, args.out)}")
            return 0
        if args.command in ("sft", "dpo"):
            return offline_command(args.command, args.config, args.overrides)
        if args.command == "cdpo":
            return cdpo_command(args.config, args.overrides)
        if args.command == "eval":
            return eval_command(args.config, args.overrides)
        cfg = load_train_config(args.config, args.overrides)
        quiet_libraries()
        from rlpost.jobs.rl import train

        result = train(cfg)  # its task's problems are checked before anything starts
    except (ConfigError, PreferenceDataError) as e:
        print(f"rlpost: error: {e}", file=sys.stderr)
        return 2

    if result.accuracy_after is None:
        print("no evaluation: set data.eval_files to evaluate before, during and after RL")
    else:
        print(f"accuracy after warm-up (before RL): {result.accuracy_before:.3f}")
        print(f"accuracy after RL:                  {result.accuracy_after:.3f}")
    print(f"run directory: {result.run_dir}")
    return 0


def offline_command(job: str, config: str, overrides: list[str]) -> int:
    """`rlpost sft` / `rlpost dpo`. Config and data errors (the data is read and checked
    here, before anything expensive starts) propagate as one-line errors."""
    from rlpost.jobs.preflight import load_offline_config

    cfg = load_train_config(config, overrides, load=partial(load_offline_config, job))
    quiet_libraries()
    from rlpost.jobs.offline import TRAINERS

    trainer = TRAINERS[job](cfg)  # reads and checks the data: a refusal leaves no run directory
    try:
        result = trainer.run()
    except BaseException as e:
        if getattr(trainer, "run_dir", None) is not None:  # it started: RUN_DIR/FAILED says why
            from rlpost.jobs.run_dir import mark_failed

            mark_failed(trainer.run_dir, e)
        raise
    finally:
        trainer.shutdown()
    before, after = result.before, result.after
    if job == "dpo" and "eval/rewards/accuracy" in after:
        print(
            f"held-out reward accuracy: {before['eval/rewards/accuracy']:.3f} -> "
            f"{after['eval/rewards/accuracy']:.3f} (margin {after['eval/rewards/margin']:.4f})"
        )
    if job == "sft" and "eval/nll" in after:
        print(f"held-out nll: {before['eval/nll']:.4f} -> {after['eval/nll']:.4f}")
    final = result.run_dir / "final_model"
    print(f"final model: {final} (start from it: model.kind=hf model.path={final})")
    print(f"run directory: {result.run_dir}")
    return 0


def eval_command(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    if cfg.from_files and cfg.data.eval_files is None:
        raise ConfigError(f"{config}: key 'data.eval_files': rlpost eval needs the sets to evaluate")
    quiet_libraries()
    from rlpost.jobs.eval import run_eval

    result = run_eval(cfg)
    print(f"eval/accuracy_greedy: {result.metrics['eval/accuracy_greedy']:.3f}")
    print(f"completions: {result.run_dir / 'eval' / 'generations.jsonl'}")
    print(f"run directory: {result.run_dir}")
    return 0


def cdpo_command(config: str, overrides: list[str]) -> int:
    from rlpost.jobs.preflight import load_cdpo_config

    cfg = load_train_config(config, overrides, load=load_cdpo_config)
    quiet_libraries()
    from rlpost.jobs.cdpo import run_cdpo

    result = run_cdpo(cfg)
    print("held-out accuracy (greedy / sampled):")
    for model, acc in result.accuracy.items():
        print(f"  {model:<6} {acc['eval/accuracy_greedy']:.3f} / {acc['eval/accuracy_sampled']:.3f}")
    print(f"run directory: {result.run_dir}")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from rlpost.sweeps.runner import run_sweep
    from rlpost.sweeps.sweep import load_sweep, yaml_text

    overrides = args.overrides + ([f"ray.address={args.ray_address}"] if args.ray_address else [])
    spec = load_sweep(args.sweep, overrides, name=args.name, output_dir=args.output_dir)
    if args.dry_run:
        print(f"sweep {spec.name}: {len(spec.runs)} runs -> {spec.directory}")
        for run in spec.runs:
            sets = {**spec.common, **run.arm_overrides, "seed": run.seed}
            print(f"  {run.id}: {' '.join(f'{k}={yaml_text(v)}' for k, v in sets.items())}")
        return 0
    try:
        return 1 if run_sweep(spec, report=not args.no_report) else 0
    except KeyboardInterrupt:
        print(f"\nsweep {spec.name} interrupted; the same command resumes it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
