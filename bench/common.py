"""Shared pieces of the benchmarks: model shapes, long-tail batches, peak memory, tables."""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# Published configurations, built with random weights (speed does not depend on them).
SHAPES = {
    # small enough for a 2-core CPU; head_dim 64 like the real ones
    "cpu-small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32768,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
}

# Dense bf16 peak of the accelerators we report MFU on.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def build_model(shape: str, dtype: torch.dtype, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1e6,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(dtype)


def long_tail_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Response lengths as RL rollouts have them: most short, a few hit the limit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) + math.log(max_len / 6))
    return [int(v) for v in x.clamp(8, max_len).round()]


def model_flops(cfg, seq_lens: list[int], scored_tokens: int) -> float:
    """Useful training FLOPs (forward + backward = 3x forward) of one update.

    Matmuls of the transformer body over every real token (2 FLOPs per
    parameter), the output head over the scored (response) tokens only, and
    causal attention scores + values (2 x 2 x n^2/2 x heads x head_dim per
    layer). Padding and recomputation are not useful work and are not counted.
    """
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    body = layers * (h * h + 2 * h * kv + h * h + 3 * h * inter)  # q, k, v, o, gate/up/down
    tokens = sum(seq_lens)
    attn = layers * 2 * cfg.num_attention_heads * head_dim * sum(n * n for n in seq_lens)
    forward = 2 * body * tokens + 2 * h * cfg.vocab_size * scored_tokens + attn
    return 3.0 * forward


def accelerator_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    return next((k for k in PEAK_FLOPS if k in name), name)


@contextmanager
def peak_memory(device: torch.device):
    """Peak bytes allocated inside the block above what was held on entry.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set
    (VmHWM), reset on entry through /proc/self/clear_refs.
    """
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the baseline is honest
        base = _rss_bytes()
        Path("/proc/self/clear_refs").write_text("5")
        yield out
        out["bytes"] = _vm_hwm_bytes() - base


def _rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _vm_hwm_bytes() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)]
    )


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def set_cpu_threads() -> None:
    torch.set_num_threads(int(os.environ.get("RLPOST_THREADS", os.cpu_count() or 1)))
