"""The fused Triton log-prob + entropy kernel (rlpost/model/triton_logprob.py) equals the
full-logits PyTorch computation, values and gradients, run on the CPU by Triton's
interpreter; the kernels compile for an H100; `learner.logprob_kernel` picks it where
it can run.

Triton builds its own library functions (tl.zeros, ...) and every kernel for the
interpreter or for the GPU when they are imported, by TRITON_INTERPRET=1 or not, and
other tests import triton first (peft does). So the kernel tests run in a child
process started with TRITON_INTERPRET=1 (`test_kernel_under_triton_interpreter`); run
directly with `TRITON_INTERPRET=1 pytest tests/model/test_triton_logprob.py` they run in
the process itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlpost.model import head_kernels, token_ops
from rlpost.model.head_kernels import head_logprobs, pick_logprob_kernel
from rlpost.model.token_ops import chunked_logprobs

NO_TRITON = "triton is not installed (pip install triton): the fused kernel cannot be run"
INTERPRETED = token_ops.triton_interpreter()
under_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs under TRITON_INTERPRET=1 in test_kernel_under_triton_interpreter's child"
)


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_kernel_under_triton_interpreter():
    pytest.importorskip("triton", reason=NO_TRITON)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", str(Path(__file__).resolve())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = child.stdout + child.stderr
    assert child.returncode == 0, out[-8000:]
    assert " passed" in out and " failed" not in out, out[-8000:]
    assert "runs under TRITON_INTERPRET=1" not in out, out[-8000:]  # the child ran them all


@pytest.fixture(scope="module")
def kernel():
    """rlpost.model.triton_logprob, its kernels built for the interpreter."""
    pytest.importorskip("triton", reason=NO_TRITON)
    import rlpost.model.triton_logprob as module

    return module


def _full_logits(hidden, weight, bias, targets, temperature):
    """The reference: every logit, fp32 log_softmax, PyTorch autograd."""
    t = temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature
    log_p = (torch.nn.functional.linear(hidden, weight, bias) / t).log_softmax(-1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def _values_and_grads(fn, inputs, targets, temperature, w_logp, w_ent, dtype=torch.float32):
    """logp, entropy and the gradients of sum(w_logp logp + w_ent entropy) (w_ent None: no
    gradient into the entropy) for hidden, weight (and bias) in `inputs`, taken in `dtype`."""
    params = [x.detach().to(dtype).requires_grad_(x.requires_grad) if x is not None else None for x in inputs]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(dtype)
    logp, ent = fn(*params, targets, temperature)
    loss = (logp * w_logp.to(dtype)).sum()
    if w_ent is not None:
        loss = loss + (ent * w_ent.to(dtype)).sum()
    loss.backward()
    grads = [p.grad for p in params if p is not None and p.requires_grad]
    return [logp.detach(), ent.detach()] + grads


# (tokens, vocabulary, hidden): 37 tokens in one token tile, 300 = 2 x 128 + 44 a vocabulary
# that is no multiple of the tile, 48 less than one hidden tile; 150 tokens in three token
# tiles (atomic adds of several programs into grad_weight) and 80 = 64 + 16 hidden.
SHAPES = [(37, 300, 48), (150, 300, 80)]


@under_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, "per_token"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_full_logits(kernel, shape, temperature, bias):
    n, v, h = shape
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.5).requires_grad_()
    b = (torch.randn(v) * 0.5).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,))
    if temperature == "per_token":  # HAPO's adaptive temperature: one T_t per token
        temperature = torch.rand(n) + 0.5
    # upstream gradients on both outputs, as a loss with an entropy bonus gives
    w_logp, w_ent = torch.randn(n), torch.randn(n)

    inputs = (hidden, weight, b)
    got = _values_and_grads(kernel.triton_logprobs, inputs, targets, temperature, w_logp, w_ent)
    ref = _values_and_grads(_full_logits, inputs, targets, temperature, w_logp, w_ent, torch.float64)

    # The kernel in fp32 against full logits in fp64. Measured over these 12 cases: at most
    # 6.7e-6 (logp), 3.9e-6 (entropy, ~5), 1.5e-5 (grad_hidden), 1.9e-5 (grad_weight),
    # 7.2e-6 (grad_bias); full logits in fp32 are no closer (8.6e-6, 4.3e-6, 2.0e-5,
    # 3.6e-5, 1.1e-5), so these bounds are fp32 rounding, not the kernel's.
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, a, r, tol in zip(names, got, ref, [1e-5, 1e-5, 5e-5, 5e-5, 5e-5]):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(
            a.double(), r, rtol=1e-5, atol=tol, msg=lambda m, name=name: f"{name}: {m}"
        )


@under_interpreter
def test_gradient_through_log_probs_only_and_frozen_head(kernel):
    """Entropy as a metric (no gradient reaches it), as in the clipped RL loss, and a head
    without gradient (LoRA): the kernel computes grad_hidden alone."""
    torch.manual_seed(1)
    n, v, h = 70, 200, 32
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h) * 0.5  # frozen
    targets = torch.randint(0, v, (n,))
    logp, _ = kernel.triton_logprobs(hidden, weight, None, targets, 0.9)
    logp.sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    _full_logits(hidden, weight, None, targets, 0.9)[0].sum().backward()
    torch.testing.assert_close(got, hidden.grad, rtol=1e-5, atol=5e-6)
    assert weight.grad is None


@under_interpreter
def test_bf16_head(kernel):
    """bf16 hidden states and head (the GPU case): fp32 log-probs and entropies as accurate
    as fp32 arithmetic on the bf16 values (logits are never rounded to bf16); gradients
    rounded once to bf16, as the chunked path's (bf16 relative step 2^-8 = 0.4%)."""
    torch.manual_seed(2)
    n, v, h = 37, 300, 48
    hidden = torch.randn(n, h).bfloat16().requires_grad_()
    weight = (torch.randn(v, h) * 0.3).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,))
    w = torch.randn(n)
    logp, ent = kernel.triton_logprobs(hidden, weight, None, targets, 1.0)
    assert logp.dtype == ent.dtype == torch.float32
    ((logp * w).sum() + ent.sum()).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16

    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_logp, ref_ent = _full_logits(h32, w32, None, targets, 1.0)
    ((ref_logp * w).sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=1e-2, atol=1e-2)


@under_interpreter
def test_dispatch_runs_the_kernel_and_agrees_with_chunked(kernel):
    """`head_logprobs` with kernel triton (CPU: only under the interpreter) against the
    chunked path it replaces, and an empty batch."""
    torch.manual_seed(3)
    n, v, h = 40, 130, 24
    head = torch.nn.Linear(h, v, bias=True)
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    temperature = torch.rand(n) + 0.5
    got = head_logprobs(hidden, head, targets, 16, temperature, kernel="triton")
    sum(o.sum() for o in got).backward()
    got_grads = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = None
    head.zero_grad()
    ref = chunked_logprobs(hidden, head, targets, 16, temperature)
    sum(o.sum() for o in ref).backward()
    for a, r in zip((*got, *got_grads), (*ref, hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=5e-6)

    logp, ent = head_logprobs(torch.zeros(0, h), head, targets[:0], 16, 1.0, kernel="triton")
    assert logp.shape == ent.shape == (0,)


def test_pick_logprob_kernel(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no CUDA needed to name it
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(head_kernels, "triton_importable", lambda: True)
    assert pick_logprob_kernel("chunked", cuda) == "chunked"
    with pytest.raises(ValueError, match=r"learner\.logprob_kernel: 'auto' is neither"):
        pick_logprob_kernel("auto", cuda)
    assert pick_logprob_kernel("triton", cuda) == "triton"
    with pytest.raises(ValueError, match=r"learner\.logprob_kernel=triton runs on CUDA devices only"):
        pick_logprob_kernel("triton", cpu)
    with pytest.raises(ValueError, match=r"learner\.logprob_kernel=triton cannot read a ZeRO-3"):
        pick_logprob_kernel("triton", cuda, partitioned=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # tests: the interpreter runs it on the CPU
    assert pick_logprob_kernel("triton", cpu) == "triton"

    monkeypatch.setattr(head_kernels, "triton_importable", lambda: False)
    with pytest.raises(ValueError, match=r"learner\.logprob_kernel=triton: the triton package"):
        pick_logprob_kernel("triton", cuda)


def test_zero3_head_is_refused_by_triton(monkeypatch):
    """A ZeRO-3 partitioned head (marked by DeepSpeed's ds_id) must be called as a module,
    which only the chunked path does."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(head_kernels, "triton_importable", lambda: True)
    head = torch.nn.Linear(8, 20, bias=False)
    head.weight.ds_id = 0
    hidden, targets = torch.randn(5, 8), torch.randint(0, 20, (5,))
    logp, _ = head_logprobs(hidden, head, targets, 4, 1.0, kernel="chunked")
    torch.testing.assert_close(logp, chunked_logprobs(hidden, head, targets, 4)[0])
    with pytest.raises(ValueError, match=r"ZeRO-3"):
        head_logprobs(hidden, head, targets, 4, 1.0, kernel="triton")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's kernels do not compile")
def test_kernels_compile_for_h100():
    """No GPU here: compile both kernels (bf16, the GPU case) for sm_90 through Triton's
    whole pipeline down to a cubin with its bundled ptxas, which the interpreter skips."""
    pytest.importorskip("triton", reason=NO_TRITON)
    try:
        from triton import compile as triton_compile
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource
    except ImportError as e:  # Triton's compiler API moved
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {e}")
    import rlpost.model.triton_logprob as jit

    pointers = dict.fromkeys(("h_ptr", "w_ptr", "b_ptr"), "*bf16") | {"y_ptr": "*i64"}
    scalars = dict.fromkeys(("N", "V", "H", "stride_h", "stride_w"), "i32")
    tiles = dict(BLOCK_N=jit.BLOCK_N, BLOCK_V=jit.BLOCK_V, BLOCK_H=jit.BLOCK_H)
    common = dict(HAS_BIAS=True, PRECISION="tf32", UPCAST=False, **tiles)
    for fn, constants in (
        (jit._forward_kernel, common),
        (jit._backward_kernel, dict(common, WANT_H=True, WANT_W=True, WANT_B=True)),
    ):
        signature = {
            a: "constexpr" if a in constants else pointers.get(a) or scalars.get(a) or "*fp32"
            for a in fn.arg_names
        }
        compiled = triton_compile(
            ASTSource(fn, signature, constants),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": jit.NUM_WARPS},
        )
        assert compiled.asm["cubin"], fn
        assert "wgmma" in compiled.asm["ptx"], "the products should run on Hopper's tensor cores"
