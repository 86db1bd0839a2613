"""One learner update (forward + backward + optimizer step over a mini-batch), three ways.

    python bench/learner_update.py                          # CPU: a small Qwen2 shape
    python bench/learner_update.py --shape qwen2.5-1.5b     # GPU: bf16, random weights

- rlpost: the product's `Learner.train_minibatch` (DeepSpeed), micro-batches cut
  by token budget; on CUDA packed rows with varlen flash attention and Liger's
  fused RMSNorm/RoPE/SwiGLU where liger-kernel is installed (the arm
  `rlpost:packed:off` turns them off), elsewhere right-padded to each
  micro-batch's own longest; log-prob and entropy chunked from hidden states.
- naive: the whole mini-batch right-padded to its longest sequence, fixed
  sequences per micro-batch, full logits and an fp32 log_softmax.
- trl: TRL's GRPO loss path (trl.GRPOTrainer._get_per_token_logps_and_entropies
  and its loss): prompts left-padded, completions right-padded to the longest in
  the mini-batch, fixed sequences per micro-batch, TRL's fused LM head
  (`add_fused_lm_head`: chunked log-prob/entropy kernel, Triton on CUDA).

All three run the same model, the same mini-batch (long-tail response lengths),
the same GRPO token-mean loss and the same DeepSpeed config and optimizer, one
after another, each in a fresh child process of this run. Reported: median update time, real tokens/s,
peak memory of an update above the model and optimizer state, MFU on CUDA
(useful FLOPs only; see `common.model_flops`), and each arm's speed relative
to the naive and TRL arms.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PEAK_FLOPS,
    SHAPES,
    accelerator_name,
    build_model,
    gib,
    long_tail_lengths,
    model_flops,
    peak_memory,
    set_cpu_threads,
    table,
    timed,
)

CLIP = 0.2
OUT_OF_MEMORY = 3  # a child's exit code


def make_samples(args, vocab: int):
    from rlpost.algorithms import build_algorithm
    from rlpost.data.batch import Sample, view

    g = torch.Generator().manual_seed(0)
    responses = long_tail_lengths(args.sequences, args.max_response, seed=1)
    samples = []
    for i, r in enumerate(responses):
        p = int(torch.randint(args.prompt_len // 2, args.prompt_len + 1, (), generator=g))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        samples.append(
            Sample(
                prompt_ids=ids[:p],
                response_ids=ids[p:],
                group=i // 8,
                advantages=torch.full((r,), float(torch.randn((), generator=g))),
                old_logp=-torch.rand(r, generator=g) * 5,
            )
        )
    algo = build_algorithm("grpo", {"loss_agg": "token-mean"})
    weights = algo.token_weights(view(samples))
    for s, w in zip(samples, weights.split([s.num_tokens for s in samples])):
        s.weights = w
    return samples


def surrogate(logp, old_logp, adv):
    ratio = torch.exp(logp - old_logp)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))


class NaiveLoss(nn.Module):
    """Full logits over every position, fp32 log_softmax, entropy from the full distribution."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, old_logp, adv, weights):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logp_all = logits[:, :-1].float().log_softmax(-1)
        logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
        return (surrogate(logp, old_logp, adv) * weights).sum(), entropy


class TRLLoss(nn.Module):
    """TRL GRPO's per-token log-probs (fused LM head) and clipped loss on its padded layout."""

    def __init__(self, lm):
        super().__init__()
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(lm, temperature=1.0, outputs=("log_probs", "entropy"))
        self.lm = lm

    def forward(self, input_ids, attention_mask, old_logp, adv, weights, logits_to_keep: int):
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        logp = out.log_probs[:, -logits_to_keep:]
        return (surrogate(logp, old_logp, adv) * weights).sum(), out.entropy[:, -logits_to_keep:]


def naive_batches(samples, micro: int, pad_id: int = 0):
    """Right-padded to the mini-batch's longest sequence; token fields on predicting positions."""
    width = max(len(s.prompt_ids) + s.num_tokens for s in samples)
    out = []
    for start in range(0, len(samples), micro):
        mb = samples[start : start + micro]
        ids = torch.full((len(mb), width), pad_id)
        mask = torch.zeros((len(mb), width), dtype=torch.long)
        fields = {k: torch.zeros((len(mb), width - 1)) for k in ("old_logp", "adv", "weights")}
        for b, s in enumerate(mb):
            p, n = len(s.prompt_ids), len(s.prompt_ids) + s.num_tokens
            ids[b, :n] = torch.tensor(s.prompt_ids + s.response_ids)
            mask[b, :n] = 1
            fields["old_logp"][b, p - 1 : n - 1] = s.old_logp
            fields["adv"][b, p - 1 : n - 1] = s.advantages
            fields["weights"][b, p - 1 : n - 1] = s.weights.float()
        out.append(({"input_ids": ids, "attention_mask": mask, **fields}, {}))
    return out


def trl_batches(samples, micro: int, pad_id: int = 0):
    """Prompts left-padded, completions right-padded, both to the mini-batch's longest."""
    p_width = max(len(s.prompt_ids) for s in samples)
    c_width = max(s.num_tokens for s in samples)
    out = []
    for start in range(0, len(samples), micro):
        mb = samples[start : start + micro]
        ids = torch.full((len(mb), p_width + c_width), pad_id)
        mask = torch.zeros_like(ids)
        fields = {k: torch.zeros((len(mb), c_width)) for k in ("old_logp", "adv", "weights")}
        for b, s in enumerate(mb):
            p, r = len(s.prompt_ids), s.num_tokens
            ids[b, p_width - p : p_width] = torch.tensor(s.prompt_ids)
            ids[b, p_width : p_width + r] = torch.tensor(s.response_ids)
            mask[b, p_width - p : p_width + r] = 1
            fields["old_logp"][b, :r] = s.old_logp
            fields["adv"][b, :r] = s.advantages
            fields["weights"][b, :r] = s.weights.float()
        out.append(({"input_ids": ids, "attention_mask": mask, **fields}, {"logits_to_keep": c_width}))
    return out


def baseline_update(engine, batches, device):
    def update():
        for i, (tensors, kwargs) in enumerate(batches):
            engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            loss, _ = engine(**{k: v.to(device) for k, v in tensors.items()}, **kwargs)
            engine.backward(loss, scale_wrt_gas=False)
        engine.step()

    return update


def rlpost_arm(args, model_dir: str, samples, packing: str = "auto", fused_kernels: str = "auto"):
    from rlpost.config.rl import TrainConfig
    from rlpost.data.batch import shard
    from rlpost.workers.group import free_port
    from rlpost.workers.learner import Learner, LRSchedule

    cfg = TrainConfig(mode="inprocess")
    cfg.model.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    cfg.learner.zero_stage = args.zero_stage
    cfg.learner.micro_batch_tokens = args.micro_tokens
    cfg.learner.gradient_checkpointing = args.gradient_checkpointing
    cfg.learner.packing = packing
    cfg.learner.fused_kernels = fused_kernels
    learner = Learner(
        cfg, model_dir, ("grpo", {"loss_agg": "token-mean"}), LRSchedule(1e-6), rank=0, world_size=1, pad_id=0
    )
    learner.setup("127.0.0.1", free_port())
    parts = shard(samples, 1, args.micro_tokens, packed=learner.packed)[0]
    label = f"rlpost ({'packed' if learner.packed else 'padded'}, {len(parts)} micro" + (
        ", liger)" if learner.fused_kernels else ")"
    )
    return learner, label, lambda: learner.train_minibatch(parts)


def run_arm(name: str, args, model_dir: str, samples, device, dtype, micro: int):
    """Median update seconds and peak memory of one arm; the padded arms run `micro`
    sequences per micro-batch."""
    import deepspeed

    from rlpost.model.load import load_model

    if name.startswith("rlpost"):  # rlpost[:packing[:fused_kernels]], e.g. rlpost:packed:off
        holder, label, update = rlpost_arm(
            args, model_dir, samples, *[part or "auto" for part in name.split(":")[1:]]
        )
    else:
        from rlpost.workers.group import free_port
        from rlpost.workers.policy_rank import deepspeed_config, join_process_group

        join_process_group(0, 1, "127.0.0.1", free_port())
        lm = load_model(model_dir, "bfloat16" if dtype == torch.bfloat16 else "float32")
        if args.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
        module = NaiveLoss(lm) if name == "naive" else TRLLoss(lm)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-6, fused=device.type == "cuda")
        holder, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=deepspeed_config(args.zero_stage, 1.0, dtype == torch.bfloat16),
        )
        make = naive_batches if name == "naive" else trl_batches
        batches = make(samples, micro)
        label = f"{name} (padded, {len(batches)} micro)"
        update = baseline_update(holder, batches, device)
    try:
        update()  # warm-up: kernels, optimizer state
        with peak_memory(device) as mem:
            update()
        seconds = timed(update, device, args.repeats, warmup=0)
        return {"arm": label, "seconds": seconds, "peak": mem["bytes"]}
    finally:
        del holder, update
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--shape", choices=SHAPES, default="qwen2.5-1.5b" if on_gpu else "cpu-small")
    ap.add_argument("--sequences", type=int, default=32 if on_gpu else 16)
    ap.add_argument("--prompt-len", type=int, default=256 if on_gpu else 64)
    ap.add_argument("--max-response", type=int, default=4096 if on_gpu else 512)
    ap.add_argument(
        "--micro-tokens",
        type=int,
        default=16384 if on_gpu else 2048,
        help="rlpost's token budget per micro-batch (learner.micro_batch_tokens)",
    )
    ap.add_argument(
        "--padded-micro",
        type=int,
        default=2 if on_gpu else 4,
        help="sequences per micro-batch of the padded arms",
    )
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arms", default="rlpost:packed,rlpost:padded,naive,trl")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # set for the per-arm child process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    set_cpu_threads()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.result:  # child: one arm, result as JSON
        from transformers import AutoConfig

        samples = make_samples(args, AutoConfig.from_pretrained(args.model_dir).vocab_size)
        try:
            row = run_arm(args.arms, args, args.model_dir, samples, device, dtype, args.padded_micro)
        except torch.OutOfMemoryError:
            sys.exit(OUT_OF_MEMORY)
        Path(args.result).write_text(json.dumps(row))
        return
    model = build_model(args.shape, dtype)
    samples = make_samples(args, model.config.vocab_size)
    seq_lens = [len(s.prompt_ids) + s.num_tokens for s in samples]
    scored = sum(s.num_tokens for s in samples)
    flops = model_flops(model.config, seq_lens, scored)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        rows = []
        # One fresh process per arm, one after another: no arm inherits another's
        # allocator state or leftover engine, so peak memory is each arm's own.
        # A padded arm that runs out of memory is retried with half the sequences per micro-batch.
        for name in args.arms.split(","):
            result, micro = Path(tmp) / "result.json", args.padded_micro
            while True:
                result.unlink(missing_ok=True)
                rc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        *sys.argv[1:],
                        "--arms",
                        name,
                        "--padded-micro",
                        str(micro),
                        "--model-dir",
                        tmp,
                        "--result",
                        str(result),
                    ]
                ).returncode
                if rc != OUT_OF_MEMORY or name.startswith("rlpost") or micro == 1:
                    break
                micro //= 2
                print(f"  {name}: out of memory; retrying with {micro} sequences per micro-batch")
            if result.exists():
                rows.append(json.loads(result.read_text()))
                print(f"  {rows[-1]['arm']}: {rows[-1]['seconds']:.3f} s", flush=True)
            else:
                rows.append({"arm": f"{name} ({'out of memory' if rc == OUT_OF_MEMORY else 'failed'})"})

    accel = accelerator_name()
    padded = len(samples) * max(seq_lens)
    print(
        f"\n{args.shape} on {accel}, {dtype}: {len(samples)} sequences, {sum(seq_lens)} real tokens "
        f"({scored} scored; padded to the longest: {padded}), responses "
        f"{min(s.num_tokens for s in samples)}-{max(s.num_tokens for s in samples)}, "
        f"ZeRO-{args.zero_stage}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"median of {args.repeats}\n"
    )
    by_name = {r["arm"].split()[0]: r for r in rows if "seconds" in r}
    for r in rows:
        if "seconds" not in r:
            continue
        r["update s"] = f"{r['seconds']:.3f}"
        r["tokens/s"] = f"{sum(seq_lens) / r['seconds']:,.0f}"
        r["peak GiB"] = gib(r["peak"])
        if accel in PEAK_FLOPS:
            r["MFU"] = f"{flops / r['seconds'] / PEAK_FLOPS[accel]:.1%}"
        for base in ("naive", "trl"):
            if base in by_name:
                r[f"speed vs {base}"] = f"{by_name[base]['seconds'] / r['seconds']:.2f}x"
    columns = (
        ["arm", "update s", "tokens/s", "peak GiB"]
        + (["MFU"] if accel in PEAK_FLOPS else [])
        + [c for c in ("speed vs naive", "speed vs trl") if c.split()[-1] in by_name]
    )
    print(table(rows, columns))


if __name__ == "__main__":
    main()
