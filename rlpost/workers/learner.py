"""A learner rank: the policy under DeepSpeed, one process per data-parallel rank.

The same class runs as a Ray actor or as a plain object in the in-process mode.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rlpost.algorithms import TokenTensors, build_algorithm
from rlpost.batch import Sample, collate
from rlpost.config import TrainConfig
from rlpost.metrics import MetricSums
from rlpost.models import load_model
from rlpost.token_ops import chunked_logprobs


class PolicyModel(nn.Module):
    """A causal LM whose forward returns log-probs and entropies of chosen tokens only."""

    def __init__(self, lm: nn.Module, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, pred_pos, targets, temperature: float = 1.0):
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_pos)
        return chunked_logprobs(hidden, self.lm.get_output_embeddings(), targets,
                                self.chunk_size, temperature)


def set_threads() -> None:
    # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; rollout and learning
    # take turns, so each may use every core of the machine.
    torch.set_num_threads(int(os.environ.get("RLPOST_THREADS", os.cpu_count() or 1)))


class Learner:
    def __init__(self, cfg: TrainConfig, model_dir: str, algorithm: tuple[str, dict], lr: float,
                 rank: int, world_size: int, master_addr: str, master_port: int, pad_id: int):
        set_threads()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed

        self.cfg, self.rank, self.world_size, self.pad_id = cfg, rank, world_size, pad_id
        self.temperature = cfg.rollout.temperature
        self.algorithm = build_algorithm(*algorithm)
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(0)  # Ray gives each learner actor one GPU
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   auto_mpi_discovery=False, rank=rank, world_size=world_size,
                                   distributed_port=master_port)
        lc = cfg.learner
        lm = load_model(model_dir, cfg.model.dtype)
        if lc.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
        policy = PolicyModel(lm, lc.logprob_chunk_size)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=lc.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": lc.micro_batch_size,
            # Accumulation boundaries are set by hand in train_minibatch, so that
            # the number of micro-batches may vary between calls.
            "gradient_accumulation_steps": 1,
            "gradient_clipping": lc.grad_clip,
            "zero_optimization": {"stage": lc.zero_stage},
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31,
            "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_config)
        self.device = self.engine.device
        self.ref = None
        if self.algorithm.needs.reference:
            self.ref = PolicyModel(load_model(model_dir, cfg.model.dtype), lc.logprob_chunk_size)
            self.ref.to(self.device).eval().requires_grad_(False)

    def _inputs(self, batch: dict) -> tuple:
        return tuple(batch[k].to(self.device) for k in ("input_ids", "attention_mask", "pred_pos", "targets"))

    @torch.no_grad()
    def logprobs(self, micro_batches: list[list[Sample]], with_ref: bool = False) -> list[dict]:
        """Per sequence: log-probs (and entropies, reference log-probs) of its response tokens."""
        self.engine.eval()
        out = []
        for mb in micro_batches:
            if not mb:
                continue
            batch = collate(mb, self.pad_id)
            inputs = self._inputs(batch)
            logp, ent = self.engine(*inputs, temperature=self.temperature)
            ref = self.ref(*inputs, temperature=self.temperature)[0] if with_ref and self.ref else None
            sizes = [s.num_tokens for s in mb]
            for i, (lp, h) in enumerate(zip(logp.cpu().split(sizes), ent.cpu().split(sizes))):
                out.append({"logp": lp, "entropy": h,
                            "ref_logp": ref.cpu().split(sizes)[i] if ref is not None else None})
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
                batch = collate(mb, self.pad_id)
                logp, entropy = self.engine(*self._inputs(batch), temperature=self.temperature)
                get = lambda k: batch[k].to(self.device) if k in batch else None  # noqa: E731
                t = TokenTensors(logp=logp, old_logp=get("old_logp"), advantages=get("advantages"),
                                 entropy=entropy if needs.entropy_grad else entropy.detach(),
                                 ref_logp=get("ref_logp"), seq_index=get("seq_index"))
                token_loss, token_metrics = self.algorithm.token_loss(t)
                loss = (token_loss.double() * get("weights")).sum()
                metrics.add_total("loss", loss.item())
                metrics.add_tokens("entropy", entropy)
                for name, values in token_metrics.items():
                    metrics.add_tokens(name, values)
            else:  # keeps this rank's collectives in step with the others
                loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters())
            self.engine.backward((loss * self.world_size).float(), scale_wrt_gas=False)
        if not apply:
            return metrics
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

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        # The process group stays: DeepSpeed caches groups made from it, and the
        # next learner in this process (in-process mode) joins the same one.
        self.engine = self.ref = None


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    return sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir()),
                  key=lambda t: int(t.split("_")[1]))
