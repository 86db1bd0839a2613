"""The config checks that need the disk or installed packages, and the loaders that run them.

They run on a loaded config before anything expensive starts."""

from __future__ import annotations

import os
from pathlib import Path

from rlpost.config.cdpo import CDPOConfig, read_cdpo_config
from rlpost.config.load import config_source, read_train_config
from rlpost.config.offline import OfflineConfig, read_offline_config
from rlpost.config.rl import TrainConfig
from rlpost.data.prompt_files import resolve_files
from rlpost.errors import ConfigError
from rlpost.model import fused_kernels
from rlpost.model.load import smollm2_gguf
from rlpost.model.lora import check_model_config
from rlpost.rewards import build_task
from rlpost.rewards.components.code_tests import problem_tests


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """The RL config, validated, its names and paths checked; nothing is loaded yet."""
    cfg = read_train_config(path, overrides)
    source = config_source(path, overrides)
    check_model_and_resume(cfg, source)
    check_data_files(cfg, source)
    check_code_tests(cfg, source)
    check_sleep_mode(cfg, source)
    return cfg


def load_offline_config(job: str, path: str | os.PathLike | None, overrides: list[str] = ()) -> OfflineConfig:
    """The config of `rlpost <job>` (sft or dpo), validated, its paths checked."""
    cfg = read_offline_config(job, path, overrides)
    check_model_and_resume(cfg, config_source(path, overrides))
    return cfg


def load_cdpo_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> CDPOConfig:
    """The cDPO pipeline's config, every stage's config validated, its paths checked."""
    cfg = read_cdpo_config(path, overrides)
    check_model_and_resume(cfg, config_source(path, overrides))
    check_sleep_mode(cfg, config_source(path, overrides))
    return cfg


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_dir_missing(path: Path) -> str | None:
    """What a HF model directory lacks of config.json, weights and a tokenizer (None: none)."""
    if not (path / "config.json").is_file():
        return "no config.json"
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        return "no weights: no *.safetensors or *.bin file"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"no tokenizer: none of {', '.join(TOKENIZER_FILES)}"
    return None


def check_code_tests(cfg: TrainConfig, source: str) -> None:
    """A `code` reward on a task's problems needs tests in them (`meta['tests']`, or JSON
    tests as the answer): checked on the task's first problem, not at the first step, where
    every sample would score 0 with a failure counted. (File rows are checked per row.)"""
    if cfg.from_files:
        return
    route = cfg.reward.route(cfg.task.name)
    index = next((i for i, c in enumerate(route) if c.name == "code"), None)
    if index is None:
        return
    key = f"reward.sources.{cfg.task.name}" if cfg.task.name in cfg.reward.sources else "reward.components"
    problem = build_task(cfg.task.name, cfg.task.args).problems(1, seed=cfg.seed)[0]
    try:
        problem_tests(problem)
    except ValueError as e:
        raise ConfigError(
            f"{source}: key '{key}.{index}': the code reward runs a problem's tests, and task "
            f"{cfg.task.name!r} has none ({e})"
        ) from None


def check_data_files(cfg: TrainConfig, source: str) -> None:
    """Every file of `data.train_files` / `data.eval_files` exists (globs match one)."""
    try:
        if cfg.from_files:
            resolve_files(cfg.data.train_files, "data.train_files")
            eval_set_files(cfg.data.eval_files)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def check_sleep_mode(cfg: TrainConfig, source: str) -> None:
    """vLLM's sleep mode exists on this machine's platform when `rollout.vllm.sleep_level`
    asks for it (vLLM has it for CUDA, ROCm and XPU; the CPU build reports it missing).
    vLLM is imported only then: the import takes seconds. The engines run on the machines
    Ray places them on: this asks the one the job starts from."""
    level = cfg.rollout.vllm.sleep_level
    if not level or cfg.rollout.engine != "vllm":
        return
    try:
        from vllm.platforms import current_platform
    except ImportError:
        raise ConfigError(f"{source}: key 'rollout.engine': vllm is not installed") from None
    if not current_platform.is_sleep_mode_available():
        raise ConfigError(
            f"{source}: key 'rollout.vllm.sleep_level': {level} needs vLLM's sleep mode, which "
            f"this machine's vLLM platform ({type(current_platform).__name__}) does not have "
            f"(CUDA, ROCm and XPU only); set rollout.vllm.sleep_level=0"
        )


def eval_set_files(spec) -> dict[str, Path]:
    """The eval sets of `data.eval_files`: one per file, named by its stem."""
    sets: dict[str, Path] = {}
    for path in resolve_files(spec, "data.eval_files") if spec is not None else []:
        name = path.name.removesuffix(path.suffix) if path.is_file() else path.name
        if name in sets:
            raise ConfigError(
                f"key 'data.eval_files': {sets[name]} and {path} would both be the eval set "
                f"{name!r}; rename one"
            )
        sets[name] = path
    return sets


def check_model_and_resume(cfg, source: str) -> None:
    """The starting model (its directory, SmolLM2's package, the LoRA targets against its
    modules) and the run to resume, of any job's config (RL, sft, dpo, cdpo)."""
    if cfg.model.kind == "hf" and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"{source}: key 'model.path': directory not found: {cfg.model.path}")
    if cfg.model.kind == "hf" and (missing := model_dir_missing(Path(cfg.model.path))):
        raise ConfigError(
            f"{source}: key 'model.path': {cfg.model.path} holds no Hugging Face model ({missing})"
        )
    if cfg.model.kind == "smollm2":
        try:
            smollm2_gguf()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if cfg.learner.fused_kernels == "liger":
        if not fused_kernels.liger_installed():
            raise ConfigError(
                f"{source}: key 'learner.fused_kernels': liger needs the liger-kernel package: "
                f"{fused_kernels.INSTALL}"
            )
    if cfg.learner.lora is not None:
        try:
            check_model_config(cfg.model, cfg.learner.lora)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if cfg.resume and not (Path(cfg.resume) / "config.yaml").is_file():
        raise ConfigError(f"{source}: key 'resume': {cfg.resume} is not a run directory (no config.yaml)")
