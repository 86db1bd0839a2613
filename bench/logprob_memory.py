"""Log-prob + entropy of chosen tokens from hidden states: peak memory and time, forward + backward.

    python bench/logprob_memory.py                    # CPU: 2,048 tokens x 32,768 vocabulary
    python bench/logprob_memory.py --tokens 16384 --vocab 151936 --hidden 896   # GPU default

- naive: full logits, an fp32 log_softmax, gather, entropy from the full distribution.
- rlpost: `rlpost.model.token_ops.chunked_logprobs` (chunks of the output head,
  recomputed in the backward pass; peak [chunk x vocab]).
- triton: rlpost's fused Triton kernel, `rlpost.model.triton_logprob.triton_logprobs`
  (`learner.logprob_kernel: triton`; no [tokens x vocab] tensor at all), GPU only.
- trl: TRL's `ChunkedLogProbFunction` (its fused LM head), when trl is installed.

The backward pass goes through the log-probs (entropy is a metric, as in the
RL loss). Peak memory is measured above the inputs and weights, one arm after
another in this process; time is the median of warm calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, peak_memory, set_cpu_threads, table, timed  # noqa: E402


def naive(hidden, weight, targets):
    logp_all = (hidden @ weight.T).float().log_softmax(-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1).detach()


def main() -> None:
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384 if on_gpu else 2048)
    ap.add_argument("--vocab", type=int, default=151936 if on_gpu else 32768)
    ap.add_argument("--hidden", type=int, default=896 if on_gpu else 256)
    ap.add_argument("--chunk", type=int, default=1024, help="rlpost's tokens per chunk")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--arms", default="naive,rlpost,triton,trl")
    args = ap.parse_args()
    set_cpu_threads()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)

    arms = {"naive": lambda: naive(hidden, weight, targets)}
    head = None
    if "rlpost" in args.arms:
        from rlpost.model.token_ops import chunked_logprobs

        head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
        head.weight = torch.nn.Parameter(weight.detach().clone())
        arms["rlpost"] = lambda: chunked_logprobs(hidden, head, targets, args.chunk)
    if "triton" in args.arms:
        if not on_gpu:
            print("triton: rlpost's fused kernel runs on CUDA only: skipping its arm")
        else:
            try:
                from rlpost.model.triton_logprob import triton_logprobs
            except ImportError:
                print("triton not installed: skipping its arm")
            else:
                arms["triton"] = lambda: triton_logprobs(hidden, weight, None, targets, 1.0)
    if "trl" in args.arms:
        try:
            from trl.kernels import ChunkedLogProbFunction
        except ImportError:
            print("trl not installed: skipping its arm")
        else:
            arms["trl"] = lambda: ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs", "entropy")
            )[:2]

    reference = None
    rows = []
    for name in args.arms.split(","):
        if name not in arms:
            continue

        def step(fn=arms[name]):
            logp, entropy = fn()
            logp.float().sum().backward()
            return logp.detach(), entropy.detach()

        logp, entropy = step()  # warm-up; also the numbers compared below
        if reference is None:
            reference = (logp.float(), entropy.float())
        err = max(
            (logp.float() - reference[0]).abs().max().item(),
            (entropy.float() - reference[1]).abs().max().item(),
        )
        hidden.grad = weight.grad = None
        if head is not None:
            head.weight.grad = None
        with peak_memory(device) as mem:
            step()
        seconds = timed(step, device, args.repeats, warmup=0)
        hidden.grad = weight.grad = None
        if head is not None:
            head.weight.grad = None
        rows.append({"arm": name, "peak": mem["bytes"], "seconds": seconds, "max |diff|": f"{err:.1e}"})
        print(f"  {name}: {seconds:.3f} s, {gib(mem['bytes'])} GiB", flush=True)

    base = rows[0]
    for r in rows:
        r["peak GiB"] = gib(r["peak"])
        r["time s"] = f"{r['seconds']:.3f}"
        r[f"memory vs {base['arm']}"] = f"{r['peak'] / base['peak']:.3f}"
        r[f"time vs {base['arm']}"] = f"{r['seconds'] / base['seconds']:.2f}"
    print(
        f"\n{args.tokens} tokens x {args.vocab} vocabulary, hidden {args.hidden}, {dtype}, "
        f"{device.type}; forward + backward; median of {args.repeats}\n"
    )
    print(
        table(
            rows,
            ["arm", "peak GiB", "time s", f"memory vs {base['arm']}", f"time vs {base['arm']}", "max |diff|"],
        )
    )


if __name__ == "__main__":
    main()
