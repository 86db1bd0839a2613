"""Packed rows through the varlen flash-attention kernel equal padded SDPA (CUDA only).

Skipped without a GPU; run on the GPU machine with `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from rlpost.data.batch import Sample, collate
from rlpost.model.attention import packed_kwargs, use_varlen_attention, varlen_available
from rlpost.model.policy import PolicyModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def small_qwen():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        attn_implementation="sdpa",
    )  # grouped-query attention, head dim 64
    return Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)


def run(policy, samples, packed: bool):
    batch = collate(samples, 0, packed)
    logp, entropy = policy(
        batch["input_ids"].cuda(),
        batch["pred_pos"].cuda(),
        batch["targets"].cuda(),
        **packed_kwargs(batch, "cuda"),
    )
    policy.zero_grad()
    logp.float().sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in policy.parameters()])
    return logp.detach().float(), entropy.detach().float(), grads


def test_varlen_packed_matches_padded_sdpa():
    assert varlen_available(torch.device("cuda"), torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    samples = [
        Sample(
            prompt_ids=torch.randint(3, 1000, (p,), generator=g).tolist(),
            response_ids=torch.randint(3, 1000, (r,), generator=g).tolist(),
        )
        for p, r in [(5, 40), (17, 3), (9, 120), (30, 1), (2, 64)]
    ]
    padded = run(PolicyModel(small_qwen(), 64), samples, packed=False)
    lm = small_qwen()
    use_varlen_attention(lm)
    packed = run(PolicyModel(lm, 64), samples, packed=True)
    # bf16: the two kernels round differently; log-probs of a random model are ~ -7
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=0.06)
    torch.testing.assert_close(packed[1], padded[1], rtol=0, atol=0.06)
    cos = torch.nn.functional.cosine_similarity(packed[2], padded[2], dim=0)
    assert cos > 0.999, cos


@pytest.mark.parametrize("kernel", ["chunked", "triton"])
def test_head_logprobs_on_cuda_match_full_logits(kernel):
    """The compiled chunk kernels and rlpost's fused Triton kernel (CUDA only) against full
    logits, fp32 (learner.logprob_kernel)."""
    from rlpost.model.head_kernels import head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 5000, bias=False).cuda()
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 5000, (300,), device="cuda")
    w = torch.randn(300, device="cuda")
    per_token = torch.rand(300, device="cuda") + 0.5  # HAPO's adaptive temperature: one T_t per token
    for temperature in (1.0, 0.7, per_token):
        logp, ent = head_logprobs(hidden, head, targets, 128, temperature, kernel)
        ((logp * w).sum() + ent.sum()).backward()
        got = (logp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone())
        hidden.grad = head.weight.grad = None
        t = temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature
        full = (head(hidden) / t).log_softmax(-1)
        ref_logp = full.gather(-1, targets[:, None]).squeeze(-1)
        ref_ent = -(full.exp() * full).sum(-1)
        ((ref_logp * w).sum() + ref_ent.sum()).backward()
        for a, b in zip(got, (ref_logp, ref_ent, hidden.grad, head.weight.grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        hidden.grad = head.weight.grad = None


@pytest.fixture
def restore_transformers_modules():
    """Liger patches functions and classes of a model family's transformers module for the
    whole process; put them back so the other tests run the eager code."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    saved = [(mod, dict(vars(mod))) for mod in (modeling_llama, modeling_qwen2)]
    yield
    for mod, attrs in saved:
        for name, value in attrs.items():
            setattr(mod, name, value)


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)


@pytest.mark.parametrize("build", [small_qwen, small_llama])
def test_liger_kernels_match_the_eager_model(build, restore_transformers_modules):
    """learner.fused_kernels=liger: packed log-probs, entropies and gradients as eager's."""
    pytest.importorskip("liger_kernel")
    from rlpost.model.fused_kernels import use_fused_kernels

    g = torch.Generator().manual_seed(2)
    samples = [
        Sample(
            prompt_ids=torch.randint(3, 1000, (p,), generator=g).tolist(),
            response_ids=torch.randint(3, 1000, (r,), generator=g).tolist(),
        )
        for p, r in [(5, 40), (17, 3), (9, 120), (30, 1), (2, 64)]
    ]
    results = []
    for liger in (False, True):
        lm = build()
        use_varlen_attention(lm)
        assert use_fused_kernels("liger" if liger else "off", lm, on_gpu=True) is liger
        results.append(run(PolicyModel(lm, 64), samples, packed=True))
    eager, fused = results
    torch.testing.assert_close(fused[0], eager[0], rtol=0, atol=0.06)
    torch.testing.assert_close(fused[1], eager[1], rtol=0, atol=0.06)
    cos = torch.nn.functional.cosine_similarity(fused[2], eager[2], dim=0)
    assert cos > 0.999, cos


def test_compute_clock_times_gpu_work_without_waiting_for_it():
    import time

    from rlpost.workers.clock import ComputeClock

    clock = ComputeClock(cuda=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with clock("update"):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles
    host = time.perf_counter() - start
    seconds = clock.take()["update"]
    assert host < 0.02 < 0.05 < seconds, (host, seconds)
    assert clock.take() == {}
    for _ in range(100):  # past the 64 regions after which finished ones are read as it goes
        with clock("update"):
            torch.cuda._sleep(1_000_000)
    torch.cuda.synchronize()
    with clock("update"):
        pass
    assert len(clock._events) < 64
    assert 100 * 1e-4 < clock.take()["update"] < 1.0


def test_liger_kernels_under_lora_and_activation_hooks(restore_transformers_modules):
    """Liger's SwiGLU still calls the projection modules: a peft adapter on them trains
    the same, and SparsePO's down_proj input hooks read the same activations."""
    pytest.importorskip("liger_kernel")
    from rlpost.config.sections import LoraConfig
    from rlpost.model.activations import activation_means
    from rlpost.model.fused_kernels import use_fused_kernels
    from rlpost.model.lora import add_lora

    g = torch.Generator().manual_seed(3)
    samples = [
        Sample(
            prompt_ids=torch.randint(3, 1000, (p,), generator=g).tolist(),
            response_ids=torch.randint(3, 1000, (r,), generator=g).tolist(),
        )
        for p, r in [(6, 30), (12, 50), (3, 9)]
    ]
    batch = collate(samples, 0, True)
    results = []
    for liger in (False, True):
        lm = small_qwen()
        use_varlen_attention(lm)
        use_fused_kernels("liger" if liger else "off", lm, on_gpu=True)
        add_lora(lm, LoraConfig(r=4), seed=0)
        for name, p in lm.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; move it so every adapter has a gradient
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(p.device).manual_seed(0))
        policy = PolicyModel(lm, 64)
        with activation_means(lm) as means:
            logp, _ = policy(
                batch["input_ids"].cuda(),
                batch["pred_pos"].cuda(),
                batch["targets"].cuda(),
                **packed_kwargs(batch, "cuda"),
            )
        logp.float().sum().backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in lm.named_parameters() if "lora_" in n])
        results.append((logp.detach().float(), torch.cat([m.flatten() for m in means["mlp"]]), grads))
    (logp0, mlp0, g0), (logp1, mlp1, g1) = results
    assert g0.abs().sum() > 0
    torch.testing.assert_close(logp1, logp0, rtol=0, atol=0.06)
    torch.testing.assert_close(mlp1, mlp0, rtol=0, atol=0.02)
    assert torch.nn.functional.cosine_similarity(g1, g0, dim=0) > 0.999
