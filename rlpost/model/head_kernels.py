"""Which kernel computes the output head's log-probs and entropies: `learner.logprob_kernel`.

"chunked" (`token_ops.chunked_logprobs`, PyTorch, any device) is the default; "triton"
(rlpost/model/triton_logprob.py) fuses the head's matmul with the log-softmax and the
entropy. The Triton kernel is exact under Triton's interpreter on the CPU, but its speed
and memory on a GPU have not been measured yet (docs/performance.md section 2), so it is
chosen only by name.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn

from rlpost.model.token_ops import Temperature, chunked_logprobs, triton_interpreter


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_logprob_kernel(
    kernel: str, device: torch.device, partitioned: bool = False
) -> Literal["chunked", "triton"]:
    """`kernel` checked against `device`. `partitioned`: the head is a ZeRO-3 partitioned
    parameter, which the Triton kernel cannot read (it takes the weight as one tensor, while
    ZeRO-3 gathers it only around a call of the head as a module). Raises ValueError naming
    the key where triton cannot run."""
    if kernel == "chunked":
        return "chunked"
    if kernel != "triton":
        raise ValueError(f"learner.logprob_kernel: {kernel!r} is neither chunked nor triton")
    if not triton_importable():
        raise ValueError("learner.logprob_kernel=triton: the triton package does not import; use chunked")
    if device.type != "cuda" and not triton_interpreter():
        raise ValueError(
            f"learner.logprob_kernel=triton runs on CUDA devices only (this one is {device.type}); "
            "use chunked"
        )
    if partitioned:
        raise ValueError(
            "learner.logprob_kernel=triton cannot read a ZeRO-3 partitioned output head "
            "(learner.zero_stage=3); use chunked"
        )
    return "triton"


def head_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    temperature: Temperature = 1.0,
    kernel: str = "chunked",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_logprobs`, or the same values and gradients from the fused Triton kernel
    where `kernel` picks it."""
    partitioned = hasattr(head.weight, "ds_id")
    if hidden.shape[0] > 0 and pick_logprob_kernel(kernel, hidden.device, partitioned) == "triton":
        from rlpost.model.triton_logprob import triton_logprobs  # imports triton: only when used

        return triton_logprobs(hidden, head.weight, head.bias, targets, temperature)
    return chunked_logprobs(hidden, head, targets, chunk_size, temperature)
