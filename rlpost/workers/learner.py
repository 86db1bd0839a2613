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
from rlpost.algorithms.preference import (CHOSEN_SIDE, PAIR_INDEX, REWARD_WEIGHT, PairSums,
                                          Preference, SparsePOMasks, activation_mask, pair_sums)
from rlpost.algorithms.selection import position_divergence
from rlpost.algorithms.sft import TOKEN_KL
from rlpost.model.attention import packed_kwargs, use_varlen_attention, varlen_available
from rlpost.data.batch import Sample, collate, per_sample
from rlpost.config.rl import TrainConfig
from rlpost.model.fused_kernels import use_fused_kernels
from rlpost.model.lora import add_lora, merged_state_dict
from rlpost.tracking.metrics import MetricSums
from rlpost.model.load import load_model
from rlpost.config.offline import OfflineConfig
from rlpost.model.token_ops import Temperature, chunked_logprobs, chunked_token_kl
from rlpost.workers.group import Slots, WorkerGroup, free_port


class PolicyModel(nn.Module):
    """A causal LM whose forward returns log-probs and entropies of chosen tokens only.

    `masks`: SparsePO's learned mask networks when the algorithm trains them, a submodule
    so that DeepSpeed's optimizer, LR schedule, ZeRO partitioning, gradient clipping and
    checkpoints cover them with the LM (`export_weights` leaves them out)."""

    def __init__(self, lm: nn.Module, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.masks: SparsePOMasks | None = None

    def hidden_states(self, input_ids, pred_pos, **attention) -> torch.Tensor:
        """[response tokens, hidden]: the final states that predict each response token."""
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False, **attention).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_pos)

    def layer_states(self, input_ids, pred_pos, **attention) -> list[torch.Tensor]:
        """[response tokens, hidden] per decoder layer, at the positions that predict each
        response token: HF's `hidden_states` less the first. That one is the embedding
        lookup, a function of the token alone with no context to judge it by; the others
        are the layers' outputs, the last after the final norm, so it is `hidden_states`'s
        result as well and one forward serves the masks and the log-probs."""
        out = self.lm.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=True,
                                 **attention)
        return [h.reshape(-1, h.shape[-1]).index_select(0, pred_pos) for h in out.hidden_states[1:]]

    def forward(self, input_ids, pred_pos, targets, temperature: Temperature = 1.0,
                rule: TemperatureRule | None = None,
                reference: tuple[torch.Tensor, nn.Module] | None = None, **attention):
        """`attention`: `packed_kwargs` of the micro-batch (mask, or positions and cu_seqlens).

        With a `rule` (scoring a batch sampled under it; `temperature` is then the base
        T), the entropies returned are those at T and the log-probs those at the
        per-token temperature T_t the rule derives from them.

        With a `reference` (its final states predicting the same targets and its output
        head), returns instead the log-probs, the reference's log-probs and the
        full-vocabulary KL(pi_ref || pi_theta) per token, from one chunked pass."""
        hidden = self.hidden_states(input_ids, pred_pos, **attention)
        head = self.lm.get_output_embeddings()
        if reference is not None:
            return chunked_token_kl(hidden, head, *reference, targets, self.chunk_size, temperature)
        logp, entropy = chunked_logprobs(hidden, head, targets, self.chunk_size, temperature)
        if rule is not None:
            logp, _ = chunked_logprobs(hidden, head, targets, self.chunk_size,
                                       temperature * rule.factor(entropy))
        return logp, entropy


class BaseModelView(PolicyModel):
    """The reference model of a LoRA policy without a second copy: the policy's own LM with
    its adapter off (peft's `disable_adapter`) and in eval mode (no dropout, as a separate
    reference would be) for each forward. LoRA never changes the base weights and the output
    head is never adapted (`lora.check_targets`), so this is exactly the initial model."""

    def __init__(self, policy: PolicyModel, adapter):
        super().__init__(policy.lm, policy.chunk_size)
        self._disable_adapter = adapter.disable_adapter  # a method: no submodule registered

    @contextmanager
    def _base(self):
        training = self.lm.training
        self.lm.eval()
        try:
            with self._disable_adapter():
                yield
        finally:
            self.lm.train(training)

    def hidden_states(self, *args, **kwargs) -> torch.Tensor:
        with self._base():
            return super().hidden_states(*args, **kwargs)

    def layer_states(self, *args, **kwargs) -> list[torch.Tensor]:
        with self._base():
            return super().layer_states(*args, **kwargs)


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
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, name: str):
        if not self.cuda:
            start = time.perf_counter()
            yield
            self._add(name, time.perf_counter() - start)
            return
        # CUDA runs asynchronously: events in the stream time the region's own kernels,
        # and are read when taken, so timing never makes the host wait for the GPU.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((name, start, end))
        if len(self._events) > 64:  # jobs that never take (sft, dpo) keep a bounded list
            self._read_events(wait=False)

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def _read_events(self, wait: bool) -> None:
        """Adds the regions whose kernels have finished (all of them, waiting, if `wait`)."""
        left = []
        for name, start, end in self._events:
            if wait or end.query():
                end.synchronize()
                self._add(name, start.elapsed_time(end) / 1e3)
            else:
                left.append((name, start, end))
        self._events = left

    def take(self) -> dict[str, float]:
        """The sums since the last take."""
        self._read_events(wait=True)
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


@contextmanager
def activation_means(lm: nn.Module):
    """Records, per kind, each decoder layer's activations averaged over their last
    dimension ([batch, length] each: SparsePO's activation masks need nothing more):
    "mlp" the MLP's hidden activations (the input of its down projection), "attention"
    the attention block's output, "residual" the residual stream after the layer."""
    layers = getattr(lm.base_model, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") and hasattr(layer.mlp, "down_proj")
                                 and hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"SparsePO activation masks read each decoder layer's mlp.down_proj and "
                         f"self_attn (Llama, Qwen, Mistral, ...); {type(lm).__name__} has no such "
                         f"layers")
    means: dict[str, list[torch.Tensor]] = {"mlp": [], "attention": [], "residual": []}

    def keep(kind: str, x) -> None:
        x = x[0] if isinstance(x, tuple) else x
        means[kind].append(x.float().mean(-1))

    handles = []
    for layer in layers:
        handles += [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: keep("mlp", args[0])),
                    layer.self_attn.register_forward_hook(lambda m, args, out: keep("attention", out)),
                    layer.register_forward_hook(lambda m, args, out: keep("residual", out))]
    try:
        yield means
    finally:
        for handle in handles:
            handle.remove()


def per_response(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat per-token values [N, ...] (in sequence order) laid out as [num_seqs, longest
    response, ...], with the bool grid of real tokens and the (row, column) of each token."""
    lengths = torch.bincount(seq_index, minlength=num_seqs)
    column = torch.arange(len(seq_index), device=seq_index.device) - (lengths.cumsum(0) - lengths)[seq_index]
    grid = values.new_zeros(num_seqs, int(lengths.max()), *values.shape[1:])
    grid[seq_index, column] = values
    valid = torch.zeros(grid.shape[:2], dtype=torch.bool, device=values.device)
    valid[seq_index, column] = True
    return grid, valid, column


class Learner:
    """Built in two phases: the constructor only records its arguments, so that every
    rank exists before `setup` joins the process group at rank 0's `rendezvous`.

    `cfg` is the RL job's TrainConfig or an offline job's config (`rlpost sft` / `rlpost
    dpo`): the learner reads its `model`, `learner` and `ray` sections."""

    def __init__(self, cfg: TrainConfig | OfflineConfig, model_dir: str, algorithm: tuple[str, dict],
                 schedule: LRSchedule, rank: int, world_size: int, pad_id: int):
        set_threads()
        self.cfg, self.model_dir, self.schedule = cfg, model_dir, schedule
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        # RL scores its samples at the temperature they were drawn at; offline data was not
        # sampled from the policy, and its losses are defined at temperature 1
        self.temperature = cfg.rollout.temperature if isinstance(cfg, TrainConfig) else 1.0
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
            # non-reentrant (transformers 5's default): the reentrant kind gives no gradient
            # to a LoRA adapter inside a layer whose inputs (frozen embeddings) need none
            lm.gradient_checkpointing_enable({"use_reentrant": False})
        # "auto": pack where the varlen kernel exists. Elsewhere SDPA attends over a packed
        # row's whole block mask, and padded micro-batches win for short responses
        # (docs/performance.md).
        varlen = varlen_available(torch.device("cuda" if on_gpu else "cpu"), lm.dtype)
        self.packed = lc.packing == "packed" or (lc.packing == "auto" and varlen)
        if self.packed and varlen:
            use_varlen_attention(lm)
        self.fused_kernels = use_fused_kernels(lc.fused_kernels, lm, on_gpu)
        # the adapter goes into `lm` in place; `self.adapter` is its PeftModel handle
        self.adapter = add_lora(lm, lc.lora, cfg.seed) if lc.lora is not None else None
        policy = PolicyModel(lm, lc.logprob_chunk_size)
        if isinstance(self.algorithm, Preference) and self.algorithm.learned_masks:
            policy.masks = self.algorithm.mask_networks(
                lm.config.num_hidden_layers, lm.config.hidden_size, cfg.seed).to(lm.dtype)
        # fused: one pass over the fp32 master weights and Adam moments instead of several
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                      lr=schedule.lr, weight_decay=lc.weight_decay, fused=on_gpu)
        # Adam moves every parameter by about lr on its first steps, whatever the
        # gradient's size; a linear warm-up keeps the first RL updates small.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
        ds_config = deepspeed_config(lc.zero_stage, lc.grad_clip, cfg.model.dtype == "bfloat16")
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
        self.device = self.engine.device
        self.ref = None
        if self.algorithm.needs.reference and self.adapter is not None:
            self.ref = BaseModelView(self.engine.module, self.adapter)
        elif self.algorithm.needs.reference:
            ref_lm = load_model(model_dir, cfg.model.dtype)
            if self.packed and varlen:
                use_varlen_attention(ref_lm)
            use_fused_kernels(lc.fused_kernels, ref_lm, on_gpu)
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
    def _reference(self, inputs: dict, with_activations: bool = False
                   ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]] | None]:
        """The reference's final states predicting each response token [N, H] and, for
        SparsePO's masks, its `activation_means` (None without)."""
        attention = {k: v for k, v in inputs.items() if k not in ("targets", "temperature")}
        if not with_activations:
            return self.ref.hidden_states(**attention), None
        with activation_means(self.ref.lm) as means:
            return self.ref.hidden_states(**attention), means

    def _sparsepo_mask(self, means: dict[str, list[torch.Tensor]], ref_hidden: torch.Tensor,
                       batch: dict, num_seqs: int) -> torch.Tensor:
        """SparsePO's activation mask (`preference.activation_mask`) of each response token,
        flat [N]: every kind read at the positions that predict the tokens, as the log-probs
        are, and normalised over each response. The logits kind is their mean over the
        vocabulary, h . mean_v W_v + mean_v b_v, never materialised."""
        pred_pos, seq_index = batch["pred_pos"].to(self.device), batch["seq_index"].to(self.device)
        head = self.ref.lm.get_output_embeddings()
        mean_logit = ref_hidden.float() @ head.weight.float().mean(0)
        if head.bias is not None:
            mean_logit = mean_logit + head.bias.float().mean()
        kinds = {kind: [x.reshape(-1).index_select(0, pred_pos) for x in layers]
                 for kind, layers in means.items()}
        kinds["logits"] = [mean_logit]
        _, valid, column = per_response(mean_logit, seq_index, num_seqs)
        grids = {kind: [per_response(x, seq_index, num_seqs)[0][..., None] for x in layers]
                 for kind, layers in kinds.items()}
        return activation_mask(grids, valid)[seq_index, column]

    @torch.no_grad()
    def _reference_layers(self, inputs: dict) -> list[torch.Tensor]:
        """The reference's `layer_states` of each response token, SparsePO's learned masks'
        input (the last is the final states)."""
        attention = {k: v for k, v in inputs.items() if k not in ("targets", "temperature")}
        return self.ref.layer_states(**attention)

    def _reference_and_masks(self, batch: dict, inputs: dict, num_seqs: int
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The reference's final states predicting each response token [N, H], and SparsePO's
        masks m^u, m^d of the tokens [N] (None, None for the other losses). Learned masks
        carry the gradient of their networks wherever the grad mode allows it."""
        algorithm = self.algorithm
        if algorithm.learned_masks:
            layers = self._reference_layers(inputs)
            m_u, m_d = self.engine.module.masks(layers)
            return layers[-1], m_u, m_d
        ref_hidden, means = self._reference(inputs, with_activations=algorithm.activation_masks)
        if means is None:
            return ref_hidden, None, None
        mask = self._sparsepo_mask(means, ref_hidden, batch, num_seqs)
        return ref_hidden, mask, mask  # one activation mask serves m^u and m^d

    def _pair_sums(self, mb: list[Sample], num_pairs: int) -> PairSums:
        """PairSums of the pairs of one micro-batch (`algorithms/preference.py`), with the
        gradient wherever the grad mode allows it."""
        batch = collate(mb, self.pad_id, self.packed)
        inputs = self._inputs(batch)
        extra = {k: v.to(self.device) for k, v in batch["extra"].items()}
        algorithm = self.algorithm
        ref_hidden, reward_weight, kl_weight = self._reference_and_masks(batch, inputs, len(mb))
        ref_head = self.ref.lm.get_output_embeddings()
        kl = None
        if algorithm.needs.token_kl:
            logp, ref_logp, kl = self.engine(**inputs, reference=(ref_hidden, ref_head))
        else:
            logp, _ = self.engine(**inputs)
            with torch.no_grad():
                ref_logp, _ = chunked_logprobs(ref_hidden, ref_head, inputs["targets"],
                                               self.cfg.learner.logprob_chunk_size, self.temperature)
        if algorithm.critical_weights:
            reward_weight = extra[REWARD_WEIGHT]
        return pair_sums(logp, ref_logp, extra[PAIR_INDEX], extra[CHOSEN_SIDE], num_pairs, kl=kl,
                         reward_weight=reward_weight, kl_weight=kl_weight)

    def train_pairs(self, micro_batches: list[list[Sample]], num_pairs: int,
                    apply: bool = True) -> tuple[MetricSums, PairSums | None]:
        """One optimizer step over this rank's share of a mini-batch of `num_pairs`
        preference pairs, numbered 0..num_pairs-1 over the whole mini-batch (PAIR_INDEX).

        Every micro-batch holds whole pairs, so each pair's sums are complete where its
        loss is taken (the preference losses are not linear in them); a micro-batch's loss
        is sum over its pairs of L_p / num_pairs, so the sum over micro-batches and ranks is
        the mini-batch's mean loss, and `* world_size` turns DeepSpeed's average over ranks
        back into that sum (as in `train_minibatch`). Returns the metric sums and this
        rank's PairSums (zero for the pairs of other ranks; the caller adds them up and
        computes `preference_metrics`). `apply=False`: as in `train_minibatch`."""
        metrics, totals = MetricSums(), []

        def micro_loss(mb: list[Sample]) -> torch.Tensor:
            with self.clock("update"):
                sums = self._pair_sums(mb, num_pairs)
                # pairs absent here have sums 0 and a loss of log 2: only the present count
                present = torch.tensor(sorted({int(s.extra[PAIR_INDEX][0]) for s in mb}),
                                       device=self.device)
                loss = self.algorithm.pair_loss(sums).index_select(0, present).sum() / num_pairs
            metrics.add_total("loss", loss)
            totals.append(sums.map(lambda x: x.detach().cpu()))
            return loss

        self._accumulate(micro_batches, micro_loss, apply, metrics)
        return metrics, sum(totals[1:], totals[0]) if totals else None

    @torch.no_grad()
    def score_pairs(self, micro_batches: list[list[Sample]], num_pairs: int) -> PairSums | None:
        """This rank's PairSums of `num_pairs` pairs without training (evaluation)."""
        self.engine.eval()
        total = None
        for mb in micro_batches:
            if mb:
                with self.clock("logprob"):
                    sums = self._pair_sums(mb, num_pairs).map(lambda x: x.cpu())
                total = sums if total is None else total + sums
        self.engine.train()
        return total

    @torch.no_grad()
    def rejected_masks(self, micro_batches: list[list[Sample]]) -> dict[int, torch.Tensor]:
        """SparsePO's m^u of the rejected response of each pair in `micro_batches` (cut by
        `shard_pairs`), by the pair's PAIR_INDEX: the token weights a person can look at."""
        self.engine.eval()
        out = {}
        for mb in micro_batches:
            if mb:
                batch = collate(mb, self.pad_id, self.packed)
                _, m_u, _ = self._reference_and_masks(batch, self._inputs(batch), len(mb))
                for s, m in zip(mb, m_u.float().cpu().split([s.num_tokens for s in mb])):
                    if not s.extra[CHOSEN_SIDE][0]:
                        out[int(s.extra[PAIR_INDEX][0])] = m
        self.engine.train()
        return out

    @torch.no_grad()
    def logprobs(self, micro_batches: list[list[Sample]], with_ref: bool = False,
                 rule: TemperatureRule | None = None) -> dict[str, torch.Tensor | None]:
        """Log-probs, entropies (and reference log-probs) of the response tokens of all
        the micro-batches, flat in their order: a few tensors cross back to the controller,
        not a few per micro-batch or per sequence.

        `rule`: the per-token temperature rule the samples were drawn under. Entropies
        are then at the base temperature, log-probs at each token's T_t, returned as
        "temperature" for the update pass to use."""
        self.engine.eval()
        parts: dict[str, list[torch.Tensor]] = {"logp": [], "entropy": [], "ref_logp": [], "temperature": []}
        for mb in micro_batches:
            if not mb:
                continue
            inputs = self._inputs(collate(mb, self.pad_id, self.packed))
            with self.clock("logprob"):
                logp, ent = self.engine(**inputs, rule=rule)
                parts["logp"].append(logp)
                parts["entropy"].append(ent)
                if rule is not None:
                    inputs["temperature"] = self.temperature * rule.factor(ent)
                    parts["temperature"].append(inputs["temperature"])
                if with_ref and self.ref is not None:
                    parts["ref_logp"].append(self.ref(**inputs)[0])
        self.engine.train()
        return {k: torch.cat(v).cpu() if v else None for k, v in parts.items()}

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

        def micro_loss(mb: list[Sample]) -> torch.Tensor:
            batch = collate(mb, self.pad_id, self.packed)
            inputs = self._inputs(batch)
            get = lambda k: batch[k].to(self.device) if k in batch else None  # noqa: E731
            extra = {k: v.to(self.device) for k, v in batch["extra"].items()}
            ref_logp = get("ref_logp")
            with self.clock("update"):
                if needs.token_kl:  # ASFT: the KL to the reference with its gradient
                    ref_hidden, _ = self._reference(inputs)
                    logp, ref_logp, extra[TOKEN_KL] = self.engine(
                        **inputs, reference=(ref_hidden, self.ref.lm.get_output_embeddings()))
                    entropy = None
                else:
                    logp, entropy = self.engine(**inputs)
                    if not needs.entropy_grad:
                        entropy = entropy.detach()
                t = TokenTensors(logp=logp, old_logp=get("old_logp"), advantages=get("advantages"),
                                 entropy=entropy, ref_logp=ref_logp, seq_index=get("seq_index"),
                                 extra=extra)
                token_loss, token_metrics = self.algorithm.token_loss(t)
                loss = (token_loss.double() * get("weights")).sum()
            metrics.add_total("loss", loss)
            if entropy is not None:
                metrics.add_tokens("entropy", entropy)
            for name, values in token_metrics.items():
                metrics.add_tokens(name, values)
            return loss

        self._accumulate(micro_batches, micro_loss, apply, metrics)
        return metrics

    def train_minibatches(self, minibatches: list[list[list[Sample]]]) -> list[MetricSums]:
        """`train_minibatch` of each of this rank's shares of mini-batches in turn, an
        optimizer step after each."""
        return [self.train_minibatch(micro_batches) for micro_batches in minibatches]

    def score_and_train(self, minibatches: list[list[list[Sample]]], with_ref: bool = False
                        ) -> tuple[dict[str, torch.Tensor | None], list[MetricSums]]:
        """An RL step's learner work in one call, when the controller needs nothing from the
        log-prob pass before the update (`Needs.old_policy_entropy` False, one epoch): the
        old policy's log-probs of this rank's samples, in the micro-batches they train in,
        then `train_minibatches`. Returns `logprobs`'s results (flat, in the order of the
        samples in `minibatches`) and the metrics."""
        micro_batches = [micro for mb in minibatches for micro in mb]
        scores = self.logprobs(micro_batches, with_ref)
        samples = [s for micro in micro_batches for s in micro]
        split = per_sample(scores, samples)
        for s, logp, ref in zip(samples, split["logp"], split["ref_logp"]):
            s.old_logp, s.ref_logp = logp, ref
        return scores, self.train_minibatches(minibatches)

    def _accumulate(self, micro_batches: list[list[Sample]], micro_loss, apply: bool,
                    metrics: MetricSums) -> None:
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
        return {n: p.grad.detach().cpu().clone() for n, p in self.engine.module.named_parameters()
                if p.grad is not None}

    def named_parameters(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Current full parameters whose names start with `prefix` (tests only, as `gradients`)."""
        return {n: p.detach().cpu().clone() for n, p in self.engine.module.named_parameters()
                if n.startswith(prefix)}

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @contextmanager
    def _whole_lm(self):
        """The LM's parameters whole on every rank for the duration (ZeRO-3 partitions them)."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.engine.module.lm.parameters()),
                                               enabled=self.cfg.learner.zero_stage == 3):
            yield

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named state dict on rank 0, None elsewhere. With LoRA: the merged weights
        under the base model's names (`lora.merged_state_dict`), what the rollout engines
        and a plain model load."""
        lm = self.engine.module.lm
        with self._whole_lm():
            if self.rank != 0:
                return None
            if self.adapter is not None:
                return merged_state_dict(lm)
            return {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}

    def put_weights(self):
        """`export_weights` put in Ray's object store from this process: the reference goes
        to the rollout workers and the weights never pass through the controller (one
        serialisation, not two)."""
        import ray

        weights = self.export_weights()
        return ray.put(weights) if weights is not None else None

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

    def shutdown(self) -> None:
        # The process group stays: DeepSpeed caches groups made from it, and the
        # next learner in this process (in-process mode) joins the same one.
        self.engine = self.ref = None


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    return sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir()),
                  key=lambda t: int(t.split("_")[1]))


def start_learner_group(cfg: TrainConfig | OfflineConfig, model_dir: Path | str,
                        algorithm: tuple[str, dict], schedule: LRSchedule, pad_id: int, use_ray: bool,
                        slots: Slots | None = None) -> WorkerGroup:
    """All ranks of a learner group, joined in one process group at rank 0's node."""
    n = cfg.learner.num_learners
    group = WorkerGroup(
        Learner, n, lambda rank: dict(cfg=cfg, model_dir=str(model_dir), algorithm=algorithm,
                                      schedule=schedule, rank=rank, world_size=n, pad_id=pad_id),
        use_ray=use_ray, num_cpus=1, num_gpus=cfg.ray.gpus_per_learner, slots=slots)
    address, port = group.call("rendezvous")[0]
    group.call("setup", address, port)
    return group
