"""Log-probs and entropies of chosen tokens from hidden states, fused with the output head
in Triton (`learner.logprob_kernel: triton`).

The same function as `token_ops.chunked_logprobs` without any [tokens x vocab] tensor,
not even a chunk of one:

- forward: each program takes BLOCK_N tokens and walks the vocabulary BLOCK_V columns at
  a time, computing that tile of logits (h @ W^T over the hidden size, fp32 accumulator)
  and folding it into a running max m, sum s = sum exp(z - m) and t = sum exp(z - m)(z - m)
  (an online softmax), so that log Z = m + log s and H = log s - t / s at the end. It keeps
  per token only logp, entropy and log Z.
- backward: one program per (token tile, vocabulary tile) recomputes the tile's logits,
  forms d loss / d logits there and adds its share of grad_hidden = g @ W and
  grad_weight = g^T @ h (and grad_bias) into fp32 buffers with atomic adds, tile by tile
  of the hidden size. No program can own a whole row of either gradient (a [tokens x
  hidden] or [vocab x hidden] accumulator does not fit in registers), hence the atomics;
  their order varies, so the gradients are not bitwise reproducible run to run (fp32
  sums, a few ulps).

Extra memory: fp32 gradient buffers of the head (as the chunked path has) and of the
hidden states ([tokens x hidden]), and O(tokens) floats. The block sizes below are starting points
that were not tuned on a GPU (docs/performance.md section 2).

Runs on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1, which must be
set before the process first imports triton), which is how tests/model/test_triton_logprob.py
checks it against full-logits PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlpost.model.token_ops import Temperature, triton_interpreter

# Tiles of tokens, vocabulary and hidden size (tl.dot needs each at least 16) and warps
# per program. Not timed on a GPU: chosen so that both kernels compile for sm_90 (wgmma)
# without register spills (ptxas -v, bf16: at 8 warps none in the forward and 8 bytes in
# the backward; at 4 warps 0.6 and 1.0 KB).
BLOCK_N = 64
BLOCK_V = 128
BLOCK_H = 64
NUM_WARPS = 8


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) in fp32. UPCAST: only under the interpreter, whose tl.dot (Triton 3.9)
    multiplies bf16 operands' raw bits as integers; fp32 copies give the right product."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _load(ptr, rows, cols, stride, row_ok, col_ok):
    """The [rows, cols] tile of a row-major matrix (`stride` elements a row); zeros outside."""
    return tl.load(
        ptr + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    )


@triton.jit
def _add(ptr, rows, cols, stride, row_ok, col_ok, value):
    """Atomically add `value` to the [rows, cols] tile of a row-major fp32 matrix. Relaxed:
    the sums need no ordering with other memory, only that no addition is lost."""
    mask = row_ok[:, None] & col_ok[None, :]
    tl.atomic_add(ptr + rows[:, None] * stride + cols[None, :], value, mask=mask, sem="relaxed")


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    H,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 logits h[rows] @ W[cols]^T (+ b[cols]). Rows and columns
    outside the tensors read zeros (so their logits are finite); the callers mask them."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = _load(h_ptr, rows, ks, stride_h, row_ok, k_ok)
        w = _load(w_ptr, cols, ks, stride_w, col_ok, k_ok)
        acc = _dot(h, tl.trans(w), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _forward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    t_ptr,
    logp_ptr,
    ent_ptr,
    lz_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # int64 offsets: vocab x hidden passes 2^31 elements for large heads (256k x 8k)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    temp = tl.load(t_ptr + rows, mask=row_ok, other=1.0)

    # m starts finite so that the first tile's rescale (m - m_new) * s is 0 * finite, not
    # -inf * 0; every tile has at least one real column, so its max is finite.
    m = tl.full([BLOCK_N], -1e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m) * (z - m)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)  # the target's z
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        logits = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            H,
            stride_h,
            stride_w,
            HAS_BIAS,
            PRECISION,
            UPCAST,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        z = logits / temp[:, None]
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        alpha = tl.exp(m - m_new)
        # columns past the vocabulary add nothing (d = 0 there keeps e * d free of -inf * 0)
        d = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)  # <= 0
        e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
        # t is kept relative to the running max (not sum p z, then log Z - E[z]) so that
        # H = log s - t / s has no cancellation between two large numbers.
        t = alpha * (t + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

    log_s = tl.log(s)
    log_z = m + log_s
    tl.store(logp_ptr + rows, z_y - log_z, mask=row_ok)
    tl.store(ent_ptr + rows, log_s - t / s, mask=row_ok)
    tl.store(lz_ptr + rows, log_z, mask=row_ok)


@triton.jit
def _backward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    t_ptr,
    lz_ptr,
    ent_ptr,
    glogp_ptr,
    gent_ptr,
    gh_ptr,
    gw_ptr,
    gb_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    WANT_H: tl.constexpr,
    WANT_W: tl.constexpr,
    WANT_B: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Token tiles vary fastest, so the programs running at once share one vocabulary
    # tile of W (read once from memory); the hidden states of all tokens fit in L2.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    temp = tl.load(t_ptr + rows, mask=row_ok, other=1.0)
    log_z = tl.load(lz_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_logp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)

    logits = _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        H,
        stride_h,
        stride_w,
        HAS_BIAS,
        PRECISION,
        UPCAST,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    log_p = logits / temp[:, None] - log_z[:, None]
    p = tl.exp(log_p)
    # z = logits / T:  d logp_y / dz = onehot(y) - p;  d H / dz = -p (log p + H)
    g = -p * (g_logp[:, None] + g_ent[:, None] * (log_p + ent[:, None]))
    g += tl.where(cols[None, :] == y[:, None], g_logp[:, None], 0.0)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g / temp[:, None], 0.0)

    if WANT_B:
        tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")
    # the products below take g in the head's dtype (bf16 on the GPU: tensor cores), as
    # the chunked path's g @ W does; they accumulate in fp32.
    g_in = g.to(w_ptr.dtype.element_ty)
    # grad_hidden and grad_weight in two passes over the hidden size rather than one, so
    # that only one product's accumulator is live at a time (fewer registers, no spills)
    if WANT_H:
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            w = _load(w_ptr, cols, ks, stride_w, col_ok, k_ok)
            gh = _dot(g_in, w, None, PRECISION, UPCAST)  # [BLOCK_N, BLOCK_H]
            _add(gh_ptr, rows, ks, H, row_ok, k_ok, gh)
    if WANT_W:
        g_t = tl.trans(g_in)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            h = _load(h_ptr, rows, ks, stride_h, row_ok, k_ok)
            gw = _dot(g_t, h.to(g_in.dtype), None, PRECISION, UPCAST)  # [BLOCK_V, BLOCK_H]
            _add(gw_ptr, cols, ks, H, col_ok, k_ok, gw)


def _precision(dtype: torch.dtype) -> str:
    # fp32 heads: exact fp32 products as torch's matmul gives by default, not TF32
    # (which tl.dot would use); bf16/fp16 run on tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreter()


def _temperatures(temperature: Temperature, n: int, device: torch.device) -> torch.Tensor:
    """[n] fp32 per-token temperatures (a float is broadcast; it is one more O(n) read)."""
    if isinstance(temperature, torch.Tensor):
        return temperature.detach().to(device=device, dtype=torch.float32).expand(n).contiguous()
    return torch.full((n,), float(temperature), device=device, dtype=torch.float32)


class _TritonLogProb(torch.autograd.Function):
    """`token_ops._ChunkedLogProb`'s semantics (gradients for hidden, weight and bias; none
    for targets or temperature; either output's gradient may be absent), fused in Triton."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: Temperature):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        (n, h), v = hidden.shape, weight.shape[0]
        temp = _temperatures(temperature, n, hidden.device)
        targets = targets.contiguous()
        logp, entropy, log_z = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3))
        _forward_kernel[(triton.cdiv(n, BLOCK_N),)](
            hidden,
            weight,
            bias if bias is not None else weight,  # a dummy pointer, never read
            targets,
            temp,
            logp,
            entropy,
            log_z,
            n,
            v,
            h,
            hidden.stride(0),
            weight.stride(0),
            HAS_BIAS=bias is not None,
            PRECISION=_precision(weight.dtype),
            UPCAST=_upcast(weight.dtype),
            BLOCK_N=BLOCK_N,
            BLOCK_V=BLOCK_V,
            BLOCK_H=BLOCK_H,
            num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(hidden, weight, bias, targets, temp, log_z, entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, temp, log_z, entropy = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        (n, h), v = hidden.shape, weight.shape[0]
        zeros = torch.zeros_like(log_z)
        grad_logp = zeros if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = zeros if grad_entropy is None else grad_entropy.float().contiguous()
        f32 = dict(device=hidden.device, dtype=torch.float32)
        grad_h = torch.zeros(n, h, **f32) if want_h else log_z  # unused pointers: any tensor
        grad_w = torch.zeros(v, h, **f32) if want_w else log_z
        grad_b = torch.zeros(v, **f32) if want_b else log_z
        if want_h or want_w or want_b:
            _backward_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V))](
                hidden,
                weight,
                bias if bias is not None else weight,
                targets,
                temp,
                log_z,
                entropy,
                grad_logp,
                grad_entropy,
                grad_h,
                grad_w,
                grad_b,
                n,
                v,
                h,
                hidden.stride(0),
                weight.stride(0),
                HAS_BIAS=bias is not None,
                WANT_H=want_h,
                WANT_W=want_w,
                WANT_B=want_b,
                PRECISION=_precision(weight.dtype),
                UPCAST=_upcast(weight.dtype),
                BLOCK_N=BLOCK_N,
                BLOCK_V=BLOCK_V,
                BLOCK_H=BLOCK_H,
                num_warps=NUM_WARPS,
            )
        return (
            grad_h.to(hidden.dtype) if want_h else None,
            grad_w.to(weight.dtype) if want_w else None,
            grad_b.to(bias.dtype) if want_b else None,
            None,
            None,
        )


def triton_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: Temperature = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], head weight [V, H] (and bias [V]), targets [N] -> logp [N], entropy [N]
    (fp32) of softmax((hidden @ weight^T + bias) / temperature), temperature a float or a
    tensor [N] per token. The head must be whole (not ZeRO-3 partitioned)."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return _TritonLogProb.apply(hidden, weight, bias, targets, temperature)
