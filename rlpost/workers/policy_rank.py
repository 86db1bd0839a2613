"""One data-parallel rank of the policy under DeepSpeed: what every learner role shares.

Built in two phases: the constructor only records its arguments, so that every rank exists
before `setup` joins the process group at rank 0's `rendezvous`. The same class runs as a
Ray actor or as a plain object in the in-process mode. A role (`learner.Learner` for token
losses, `pair_learner.PairLearner` for preference pairs) adds what its steps compute and
hands each micro-batch's loss to `_accumulate`, which owns the backward passes and the
optimizer step.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.offline import OfflineConfig
from rlpost.config.rl import TrainConfig
from rlpost.config.sections import LearnerConfig
from rlpost.data.batch import Sample
from rlpost.engines.weight_sync import TransferGroup
from rlpost.model.attention import packed_kwargs
from rlpost.model.export import export_state_dict
from rlpost.model.policy import PolicyModel, load_policy, load_reference
from rlpost.tracking.metrics import MetricSums
from rlpost.workers.clock import ComputeClock
from rlpost.workers.group import free_port
from rlpost.workers.offload import offload_optimizer_state, reload_optimizer_state
from rlpost.workers.threads import set_threads
from rlpost.workers.weight_sender import WeightSender


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    warmup_steps: int = 0
    kind: str = "constant"  # or "cosine": decays to 10% of lr at total_steps
    total_steps: int = 1

    def factor(self, step: int) -> float:
        """LR multiplier after `step` optimizer steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0


def join_process_group(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """This process's place in the learners' torch.distributed group (NCCL on CUDA, else gloo)."""
    import deepspeed

    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        auto_mpi_discovery=False,
        rank=rank,
        world_size=world_size,
        distributed_port=master_port,
    )


def deepspeed_config(zero_stage: int, grad_clip: float, bf16: bool) -> dict:
    return {
        # Nominal: micro-batches are cut by token budget and accumulation
        # boundaries are set by hand in train_minibatch, so both may vary.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


def deepspeed_engine(policy: PolicyModel, schedule: LRSchedule, lc: LearnerConfig, bf16: bool, on_gpu: bool):
    """The DeepSpeed engine that trains `policy`'s trainable parameters with AdamW under
    `schedule`, in this process's place in the learners' group (`join_process_group`)."""
    import deepspeed

    # fused: one pass over the fp32 master weights and Adam moments instead of several
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=schedule.lr,
        weight_decay=lc.weight_decay,
        fused=on_gpu,
    )
    # Adam moves every parameter by about lr on its first steps, whatever the
    # gradient's size; a linear warm-up keeps the first RL updates small.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    engine, *_ = deepspeed.initialize(
        model=policy,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(lc.zero_stage, lc.grad_clip, bf16),
    )
    return engine


class PolicyRank:
    """`cfg` is the RL job's TrainConfig or an offline job's config (`rlpost sft` / `rlpost
    dpo`): the rank reads its `model`, `learner` and `ray` sections."""

    def __init__(
        self,
        cfg: TrainConfig | OfflineConfig,
        model_dir: str,
        algorithm: tuple[str, dict] | None,
        schedule: LRSchedule,
        rank: int,
        world_size: int,
        pad_id: int,
    ):
        set_threads("learner")
        self.cfg, self.model_dir, self.schedule = cfg, model_dir, schedule
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        # RL scores its samples at the temperature they were drawn at; offline data was not
        # sampled from the policy, and its losses are defined at temperature 1
        self.temperature = cfg.rollout.temperature if isinstance(cfg, TrainConfig) else 1.0
        # None: a role that trains no policy loss (the critic): no algorithm, no reference
        self.algorithm = build_algorithm(*algorithm) if algorithm is not None else None
        self.sender: WeightSender | None = None  # made by weight_plan
        self.transfer: TransferGroup | None = None  # rank 0's, opened by connect_weights

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it (the caller uses rank 0's)."""
        import ray

        address = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        return address, free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        cfg, schedule, lc = self.cfg, self.schedule, self.cfg.learner
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(0)  # Ray gives each learner actor one GPU
        self.clock = ComputeClock(cuda=on_gpu)
        join_process_group(self.rank, self.world_size, master_addr, master_port)
        policy, self.adapter, self.packed, self.fused_kernels = load_policy(
            self.model_dir, cfg.model.dtype, lc, cfg.seed, torch.device("cuda" if on_gpu else "cpu")
        )
        self.add_trained_modules(policy)
        self.engine = deepspeed_engine(policy, schedule, lc, cfg.model.dtype == "bfloat16", on_gpu)
        self.device = self.engine.device
        self.ref = None
        if self.algorithm is not None and self.algorithm.needs.reference:
            self.ref = load_reference(
                self.engine.module,
                self.adapter,
                self.model_dir,
                cfg.model.dtype,
                lc,
                self.packed,
                self.device,
            )

    def add_trained_modules(self, policy: PolicyModel) -> None:
        """Modules the optimizer trains with the LM, added to `policy` before DeepSpeed
        wraps it: none unless a role adds them."""

    def _inputs(self, batch: dict) -> dict:
        """Model inputs; the temperature is per token where the batch carries one."""
        temperature = batch["temperature"].to(self.device) if "temperature" in batch else self.temperature
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "pred_pos": batch["pred_pos"].to(self.device),
            "targets": batch["targets"].to(self.device),
            "temperature": temperature,
            **packed_kwargs(batch, self.device),
        }

    @staticmethod
    def _attention(inputs: dict) -> dict:
        """`_inputs` less what only the output head reads: a hidden-state forward's arguments."""
        return {k: v for k, v in inputs.items() if k not in ("targets", "temperature")}

    @torch.no_grad()
    def _reference(self, inputs: dict) -> torch.Tensor:
        """The reference's final states predicting each response token [N, H]."""
        return self.ref.hidden_states(**self._attention(inputs))

    def _accumulate(
        self, micro_batches: list[list[Sample]], micro_loss, apply: bool, metrics: MetricSums
    ) -> None:
        """Forward/backward of each micro-batch (`micro_loss`: its share of the mini-batch
        loss), then the optimizer step unless `apply` is False. An empty micro-batch
        backpropagates a zero loss to keep this rank's collectives in step with the others."""
        for i, mb in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss = micro_loss(mb) if mb else sum(p.sum() * 0.0 for p in self.engine.module.parameters())
            with self.clock("update"):
                self.engine.backward((loss * self.world_size).float(), scale_wrt_gas=False)
        if not apply:
            return
        metrics.add_mean("lr", self.engine.get_lr()[0])
        with self.clock("update"):
            self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics.add_mean("grad_norm", float(grad_norm))

    def gradients(self) -> dict[str, torch.Tensor]:
        """Current full gradients (tests only; stage 0 keeps them on the parameters)."""
        return {
            n: p.grad.detach().cpu().clone()
            for n, p in self.engine.module.named_parameters()
            if p.grad is not None
        }

    def named_parameters(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Current full parameters whose names start with `prefix` (tests only, as `gradients`)."""
        return {
            n: p.detach().cpu().clone()
            for n, p in self.engine.module.named_parameters()
            if n.startswith(prefix)
        }

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @contextmanager
    def _whole_lm(self):
        """The LM's parameters whole on every rank for the duration (ZeRO-3 partitions them)."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(
            list(self.engine.module.lm.parameters()), enabled=self.cfg.learner.zero_stage == 3
        ):
            yield

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """The LM's `export_state_dict` on rank 0, None elsewhere."""
        with self._whole_lm():
            lm = self.engine.module.lm
            return export_state_dict(lm, self.adapter is not None) if self.rank == 0 else None

    # ----- weight sync (rlpost/engines/weight_sync.py) -------------------------------------
    def weight_plan(self, wire_dtype: str, bucket_bytes: int) -> list:
        """The `SyncPlan` (plain data) of this LM's weights for engines in `wire_dtype`."""
        self.sender = WeightSender(
            self.engine.module.lm,
            self.adapter is not None,
            self.cfg.learner.zero_stage == 3,
            wire_dtype,
            bucket_bytes,
        )
        return self.sender.plan.to_list()

    def connect_weights(
        self, address: str | None, port: int, world_size: int, timeout_s: float, ipc: bool
    ) -> None:
        """Open a transfer group as its sender (rank 0); a rank given no `address` sends to
        no engine (it takes part in the syncs' gathers only)."""
        if address is not None:
            self.transfer = TransferGroup(address, port, 0, world_size, self.device, timeout_s, ipc)

    @property
    def weight_version(self) -> int:
        """Optimizer steps taken: the version of the weights a sync sends (a checkpoint keeps it)."""
        return int(self.engine.global_steps)

    def send_weights(self) -> int:
        """One sync over the transfer group (every rank: ZeRO-3 gathers each bucket with a
        collective). Returns the version sent."""
        version = self.weight_version
        self.sender.send(version, self.transfer, self.device)
        return version

    def packed_buckets(self):
        """`WeightSender.packed` on this rank, for a transport in this process."""
        return self.sender.packed(self.device, self.rank == 0)

    def save_pretrained(self, out_dir: str) -> None:
        """A plain HF model directory; with LoRA, the merged model and the adapter alone in
        `out_dir`/adapter (peft's format)."""
        weights = self.export_weights()
        if weights is not None:
            self.engine.module.lm.save_pretrained(out_dir, state_dict=weights)
        if self.adapter is not None:
            with self._whole_lm():
                if self.rank == 0:
                    self.adapter.save_pretrained(Path(out_dir) / "adapter")

    def save_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=tag)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint {tag!r} in {ckpt_dir}")

    def take_compute_times(self) -> dict[str, float]:
        return self.clock.take()

    def is_packed(self) -> bool:
        return self.packed

    def ping(self) -> int:
        return self.rank

    def offload_optimizer(self) -> None:
        """The optimizer state to CPU memory until `reload_optimizer` (learner.offload_optimizer)."""
        offload_optimizer_state(self.engine)

    def reload_optimizer(self) -> None:
        reload_optimizer_state(self.engine)

    def shutdown(self) -> None:
        # The process group stays: DeepSpeed caches groups made from it, and the
        # next learner in this process (in-process mode) joins the same one.
        if self.transfer is not None:
            self.transfer.close()
        self.engine = self.ref = self.transfer = None

    def node_id(self) -> str | None:
        """The Ray node this rank runs on (None in-process): placement tests ask."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
