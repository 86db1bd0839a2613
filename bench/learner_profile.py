"""Where the time of one rlpost learner update goes (GPU).

    python bench/learner_profile.py --shape qwen2.5-1.5b --variants off,liger,liger@8192

Each variant runs in a fresh child process on the batch of `learner_update.py`: median
update seconds, MFU, and the GPU kernel time of one profiled update split by kind
(matrix products, attention, Triton kernels, elementwise, optimizer, copies), with the
kernels that took longest. A variant is `fused_kernels[@tokens]`: the value of
`learner.fused_kernels` (`off`, `liger`, `auto`) and, after `@`, the micro-batch token
budget. Update time minus the GPU's busy time is time the GPU waited for the host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEAK_FLOPS, accelerator_name, build_model, model_flops, timed  # noqa: E402
from learner_update import make_samples, rlpost_arm  # noqa: E402

KINDS = [  # first match wins
    ("attention", ("flash", "fmha", "attn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton", ("triton", "liger", "_rms_norm", "_swiglu", "_rope")),
    ("copy", ("memcpy", "memset", "copy", "cat", "index")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def child(args, variant: str) -> dict:
    from transformers import AutoConfig

    fused_kernels, _, tokens = variant.partition("@")
    args.micro_tokens = int(tokens or args.micro_tokens)
    samples = make_samples(args, AutoConfig.from_pretrained(args.model_dir).vocab_size)
    learner, label, update = rlpost_arm(args, args.model_dir, samples, "packed", fused_kernels)
    device = torch.device("cuda")
    update()  # warm-up: kernels, optimizer state
    seconds = timed(update, device, args.repeats, warmup=0)
    peak = torch.cuda.max_memory_allocated()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        update()
        torch.cuda.synchronize()
    by_kind, by_kernel = defaultdict(float), defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(e.name)] += e.device_time / 1e6
            by_kernel[e.name] += e.device_time / 1e6
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "variant": variant,
        "label": label,
        "seconds": seconds,
        "peak": peak,
        "kinds": dict(by_kind),
        "top": top,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--variants", default="off,liger")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-response", type=int, default=4096)
    ap.add_argument("--micro-tokens", type=int, default=16384)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.result:
        Path(args.result).write_text(json.dumps(child(args, args.variants)))
        return
    model = build_model(args.shape, torch.bfloat16)
    samples = make_samples(args, model.config.vocab_size)
    seq_lens = [len(s.prompt_ids) + s.num_tokens for s in samples]
    flops = model_flops(model.config, seq_lens, sum(s.num_tokens for s in samples))
    peak_flops = PEAK_FLOPS.get(accelerator_name(), float("nan"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        for variant in args.variants.split(","):
            result = Path(tmp) / "result.json"
            result.unlink(missing_ok=True)
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *sys.argv[1:],
                    "--variants",
                    variant,
                    "--model-dir",
                    tmp,
                    "--result",
                    str(result),
                ]
            )
            if not result.exists():
                print(f"{variant}: failed", flush=True)
                continue
            r = json.loads(result.read_text())
            busy = sum(r["kinds"].values())
            print(
                f"\n{variant} ({r['label']}): {r['seconds']:.3f} s, MFU "
                f"{flops / r['seconds'] / peak_flops:.1%}, peak {r['peak'] / 2**30:.1f} GiB, "
                f"GPU busy {busy:.3f} s"
            )
            print(
                "  " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["kinds"].items(), key=lambda kv: -kv[1]))
            )
            for name, sec in r["top"]:
                print(f"    {sec:.4f}  {kind_of(name):11s} {name[:110]}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
