"""A learner rank: the policy under DeepSpeed, one process per data-parallel rank.

The same class runs as a Ray actor or as a plain object in the in-process mode.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlpost.algorithms import TokenTensors, build_algorithm
from rlpost.algorithms.hapo import TemperatureRule
from rlpost.algorithms.selection import position_divergence
from rlpost.attention import packed_kwargs, use_varlen_attention, varlen_available
from rlpost.batch import Sample, collate
from rlpost.config import TrainConfig
from rlpost.metrics import MetricSums
from rlpost.models import load_model
from rlpost.token_ops import Temperature, chunked_logprobs
from rlpost.workers.group import WorkerGroup, free_port


class PolicyModel(nn.Module):
    """A causal LM whose forward returns log-probs and entropies of chosen tokens only."""

    def __init__(self, lm: nn.Module, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def hidden_states(self, input_ids, pred_pos, **attention) -> torch.Tensor:
        """[response tokens, hidden]: the final states that predict each response token."""
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False, **attention).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_pos)

    def forward(self, input_ids, pred_pos, targets, temperature: Temperature = 1.0,
                rule: TemperatureRule | None = None, **attention):
        """`attention`: `packed_kwargs` of the micro-batch (mask, or positions and cu_seqlens).

        With a `rule` (scoring a batch sampled under it; `temperature` is then the base
        T), the entropies returned are those at T and the log-probs those at the
        per-token temperature T_t the rule derives from them."""
        hidden = self.hidden_states(input_ids, pred_pos, **attention)
        head = self.lm.get_output_embeddings()
        logp, entropy = chunked_logprobs(hidden, head, targets, self.chunk_size, temperature)
        if rule is not None:
            logp, _ = chunked_logprobs(hidden, head, targets, self.chunk_size,
                                       temperature * rule.factor(entropy))
        return logp, entropy


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


class ComputeClock:
    """Seconds a worker spends in its compute (generation, forward, backward,
    optimizer step), summed per name until taken: the controller compares them
    with its wall times to see what the framework itself costs."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        # CUDA runs asynchronously: without a barrier on both sides, kernels queued
        # before the region would count in it and its own would count after it.
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The sums since the last take."""
        seconds, self.seconds = self.seconds, {}
        return seconds


def join_process_group(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """This process's place in the learners' torch.distributed group (NCCL on CUDA, else gloo)."""
    import deepspeed

    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, rank=rank, world_size=world_size,
                               distributed_port=master_port)


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


def set_threads() -> None:
    # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; rollout and learning
    # take turns, so each may use every core of the machine.
    torch.set_num_threads(int(os.environ.get("RLPOST_THREADS", os.cpu_count() or 1)))


class Learner:
    """Built in two phases: the constructor only records its arguments, so that every
    rank exists before `setup` joins the process group at rank 0's `rendezvous`."""

    def __init__(self, cfg: TrainConfig, model_dir: str, algorithm: tuple[str, dict],
                 schedule: LRSchedule, rank: int, world_size: int, pad_id: int):
        set_threads()
        self.cfg, self.model_dir, self.schedule = cfg, model_dir, schedule
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.temperature = cfg.rollout.temperature
        self.algorithm = build_algorithm(*algorithm)

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it (the caller uses rank 0's)."""
        import ray

        address = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        return address, free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        import deepspeed

        cfg, model_dir, schedule = self.cfg, self.model_dir, self.schedule
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(0)  # Ray gives each learner actor one GPU
        self.clock = ComputeClock(cuda=on_gpu)
        join_process_group(self.rank, self.world_size, master_addr, master_port)
        lc = cfg.learner
        lm = load_model(model_dir, cfg.model.dtype)
        if lc.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
        # "auto": pack where the varlen kernel exists. Elsewhere SDPA attends over a packed
        # row's whole block mask, and padded micro-batches win for short responses
        # (docs/performance.md).
        varlen = varlen_available(torch.device("cuda" if on_gpu else "cpu"), lm.dtype)
        self.packed = lc.packing == "packed" or (lc.packing == "auto" and varlen)
        if self.packed and varlen:
            use_varlen_attention(lm)
        policy = PolicyModel(lm, lc.logprob_chunk_size)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=schedule.lr, weight_decay=lc.weight_decay)
        # Adam moves every parameter by about lr on its first steps, whatever the
        # gradient's size; a linear warm-up keeps the first RL updates small.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
        ds_config = deepspeed_config(lc.zero_stage, lc.grad_clip, cfg.model.dtype == "bfloat16")
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
        self.device = self.engine.device
        self.ref = None
        if self.algorithm.needs.reference:
            ref_lm = load_model(model_dir, cfg.model.dtype)
            if self.packed and varlen:
                use_varlen_attention(ref_lm)
            self.ref = PolicyModel(ref_lm, lc.logprob_chunk_size)
            self.ref.to(self.device).eval().requires_grad_(False)

    def _inputs(self, batch: dict) -> dict:
        """Model inputs; the temperature is per token where the batch carries one."""
        temperature = batch["temperature"].to(self.device) if "temperature" in batch else self.temperature
        return {"input_ids": batch["input_ids"].to(self.device),
                "pred_pos": batch["pred_pos"].to(self.device),
                "targets": batch["targets"].to(self.device),
                "temperature": temperature, **packed_kwargs(batch, self.device)}

    @torch.no_grad()
    def logprobs(self, micro_batches: list[list[Sample]], with_ref: bool = False,
                 rule: TemperatureRule | None = None) -> list[dict]:
        """Per micro-batch: log-probs, entropies (and reference log-probs) of its response
        tokens, flat in sequence order (a few tensors cross back, not three per sequence).

        `rule`: the per-token temperature rule the samples were drawn under. Entropies
        are then at the base temperature, log-probs at each token's T_t, returned as
        "temperature" for the update pass to use."""
        self.engine.eval()
        out = []
        for mb in micro_batches:
            if not mb:
                continue
            inputs = self._inputs(collate(mb, self.pad_id, self.packed))
            temperature = None
            with self.clock("logprob"):
                logp, ent = self.engine(**inputs, rule=rule)
                if rule is not None:
                    temperature = inputs["temperature"] = self.temperature * rule.factor(ent)
                ref = self.ref(**inputs)[0] if with_ref and self.ref is not None else None
            out.append({"logp": logp.cpu(), "entropy": ent.cpu(),
                        "ref_logp": ref.cpu() if ref is not None else None,
                        "temperature": temperature.cpu() if temperature is not None else None})
        self.engine.train()
        return out

    @torch.no_grad()
    def position_divergence(self, groups: list[list[Sample]]) -> list[torch.Tensor]:
        """TW-GRPO's D_t for each group (`selection.position_divergence`) over response
        positions t < the group's longest response, at the sampling temperature.

        Memory is planned like the log-prob pass: one forward per group, then at most
        `logprob_chunk_size` rows of full-vocabulary log-probs at a time (a chunk of
        positions x the group's rollouts); positions past a rollout's end take the
        uniform distribution without computing anything."""
        model = self.engine.module
        head = model.lm.get_output_embeddings()
        self.engine.eval()
        out = []
        for group in groups:
            batch = collate(group, self.pad_id, self.packed)
            with self.clock("logprob"):
                hidden = model.hidden_states(batch["input_ids"].to(self.device),
                                             batch["pred_pos"].to(self.device),
                                             **packed_kwargs(batch, self.device))
                lengths = [s.num_tokens for s in group]
                starts = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
                longest, vocab = max(lengths), head.out_features  # (ZeRO-3 empties .weight)
                step = max(1, self.cfg.learner.logprob_chunk_size // len(group))
                divergence = []
                for t0 in range(0, longest, step):
                    t1 = min(t0 + step, longest)
                    # fp64: D is a small difference of large sums (0 where all rollouts agree)
                    block = torch.full((len(group), t1 - t0, vocab), -math.log(vocab),
                                       dtype=torch.float64, device=self.device)
                    for i, (start, n) in enumerate(zip(starts, lengths)):
                        if t0 < n:
                            rows = hidden[start + t0:start + min(t1, n)]
                            block[i, :len(rows)] = (head(rows).double() / self.temperature).log_softmax(-1)
                    divergence.append(position_divergence(block))
            out.append(torch.cat(divergence).cpu())
        self.engine.train()
        return out

    def train_minibatch(self, micro_batches: list[list[Sample]], apply: bool = True) -> MetricSums:
        """One optimizer step over this rank's share of a mini-batch.

        Each micro-batch loss is sum(weight * token_loss) with weights normalised
        over the whole mini-batch, so the sum over micro-batches and ranks is the
        mini-batch loss. DeepSpeed averages gradients over ranks; multiplying by
        the world size turns that average back into the sum. `apply=False` leaves
        the summed gradients in place without stepping (tests read them).
        """
        metrics = MetricSums()
        needs = self.algorithm.needs
        for i, mb in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            if mb:
                batch = collate(mb, self.pad_id, self.packed)
                inputs = self._inputs(batch)
                get = lambda k: batch[k].to(self.device) if k in batch else None  # noqa: E731
                with self.clock("update"):
                    logp, entropy = self.engine(**inputs)
                    t = TokenTensors(logp=logp, old_logp=get("old_logp"), advantages=get("advantages"),
                                     entropy=entropy if needs.entropy_grad else entropy.detach(),
                                     ref_logp=get("ref_logp"), seq_index=get("seq_index"),
                                     extra={k: v.to(self.device) for k, v in batch["extra"].items()})
                    token_loss, token_metrics = self.algorithm.token_loss(t)
                    loss = (token_loss.double() * get("weights")).sum()
                metrics.add_total("loss", loss.item())
                metrics.add_tokens("entropy", entropy)
                for name, values in token_metrics.items():
                    metrics.add_tokens(name, values)
            else:  # keeps this rank's collectives in step with the others
                loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters())
            with self.clock("update"):
                self.engine.backward((loss * self.world_size).float(), scale_wrt_gas=False)
        if not apply:
            return metrics
        metrics.add_mean("lr", self.engine.get_lr()[0])
        with self.clock("update"):
            self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics.add_mean("grad_norm", float(grad_norm))
        return metrics

    def gradients(self) -> dict[str, torch.Tensor]:
        """Current full gradients (tests only; stage 0 keeps them on the parameters)."""
        return {n: p.grad.detach().cpu().clone() for n, p in self.engine.module.named_parameters()
                if p.grad is not None}

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named state dict on rank 0 (gathered under ZeRO-3), None elsewhere."""
        import deepspeed

        lm = self.engine.module.lm
        params = list(lm.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if self.cfg.learner.zero_stage == 3 else None
        if gather:
            gather.__enter__()
        try:
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}
        finally:
            if gather:
                gather.__exit__(None, None, None)

    def save_pretrained(self, out_dir: str) -> None:
        weights = self.export_weights()
        if weights is not None:
            self.engine.module.lm.save_pretrained(out_dir, state_dict=weights)

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

    def shutdown(self) -> None:
        # The process group stays: DeepSpeed caches groups made from it, and the
        # next learner in this process (in-process mode) joins the same one.
        self.engine = self.ref = None


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    return sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir()),
                  key=lambda t: int(t.split("_")[1]))


def start_learner_group(cfg: TrainConfig, model_dir: Path | str, algorithm: tuple[str, dict],
                        schedule: LRSchedule, pad_id: int, use_ray: bool) -> WorkerGroup:
    """All ranks of a learner group, joined in one process group at rank 0's node."""
    n = cfg.learner.num_learners
    group = WorkerGroup(
        Learner, n, lambda rank: dict(cfg=cfg, model_dir=str(model_dir), algorithm=algorithm,
                                      schedule=schedule, rank=rank, world_size=n, pad_id=pad_id),
        use_ray=use_ray, num_cpus=1, num_gpus=cfg.ray.gpus_per_learner)
    address, port = group.call("rendezvous")[0]
    group.call("setup", address, port)
    return group
