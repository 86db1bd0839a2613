"""`rlpost train CONFIG [key.sub=value ...]`"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlpost.config import ConfigError, load_config, parse_override


def load_train_config(config: str, overrides: list[str]):
    """The config of a new run, or of the run named by `resume=<run dir>` plus the overrides."""
    resume = None
    for text in overrides:
        key, value = parse_override(text)
        if key == ["resume"]:
            resume = str(value)
    if resume is None:
        return load_config(config, overrides)
    saved = Path(resume) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume: {resume} is not a run directory (no config.yaml)")
    rest = [o for o in overrides if parse_override(o)[0] != ["resume"]]
    return load_config(saved, rest + [f"resume={resume}"])


def quiet_libraries() -> None:
    """Keep the console for rlpost's progress lines. Set before the libraries load;
    Ray workers started from here inherit the environment."""
    for key, value in {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed would otherwise warn in every process that it fell back to the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlpost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run a training job from a YAML config")
    p_train.add_argument("config", help="YAML config file")
    p_train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rlpost: error: {e}", file=sys.stderr)
        return 2

    quiet_libraries()
    from rlpost.trainer import train

    result = train(cfg)
    print(f"accuracy after warm-up (before RL): {result.accuracy_before:.3f}")
    print(f"accuracy after RL:                  {result.accuracy_after:.3f}")
    print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
