"""LoRA through peft (`learner.lora`, rlpost/model/lora.py): only the adapter trains, the reference
is the base model with the adapter off, and everything leaving the learner (weight sync,
saved models) is the merged model under the base model's names."""

from __future__ import annotations

import pytest
import torch

from rlpost.algorithms import build_algorithm
from rlpost.config.rl import TrainConfig
from rlpost.data.batch import collate, view
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config, load_offline_config
from rlpost.model.load import load_model
from rlpost.model.policy import PolicyModel
from rlpost.workers.learner import Learner, LRSchedule
from rlpost.workers.rollout import RolloutWorker
from tests.run_helpers import ROOT, read_metrics, run_train
from tests.runs.test_offline_runs import CONFIGS, run_job, write_data
from tests.runs.test_runs import assert_same_metrics
from tests.workers.test_weight_transfer import fixed_samples

GRPO_KL = ("grpo", {"kl_coef": 0.1})  # an RL loss that needs the reference model
LORA_PARAMS = 2 * 3 * 4 * (64 + 128)  # layers x MLP projections x r x (in + out): A and B


def lora_learner(model_dir, lora=None, rollout=None, **learner) -> Learner:
    cfg = TrainConfig(mode="inprocess", learner={"lora": lora or {"r": 4}, **learner}, rollout=rollout or {})
    out = Learner(cfg, str(model_dir), GRPO_KL, LRSchedule(1e-2), rank=0, world_size=1, pad_id=0)
    out.setup(*out.rendezvous())
    return out


def rl_step(learner: Learner, samples) -> None:
    """One optimizer step of GRPO with its KL term on `samples` (two micro-batches)."""
    sizes = [s.num_tokens for s in samples]
    out = learner.logprobs([samples], with_ref=True)
    for s, lp, ref in zip(samples, out["logp"].split(sizes), out["ref_logp"].split(sizes)):
        s.old_logp, s.ref_logp = lp, ref
    for s, w in zip(samples, build_algorithm(*GRPO_KL).token_weights(view(samples)).split(sizes)):
        s.weights = w
    learner.train_minibatch([samples[:2], samples[2:]])


def initial_logprobs(model_dir, learner: Learner, samples) -> torch.Tensor:
    """The frozen initial model's log-probs of the samples' responses, as PolicyModel computes them."""
    with torch.no_grad():
        return PolicyModel(load_model(model_dir), 1024).eval()(
            **learner._inputs(collate(samples, 0, learner.packed))
        )[0]


def test_updates_move_only_the_adapter(model_dir):
    learner = lora_learner(model_dir)
    try:
        trainable = [p for group in learner.engine.basic_optimizer.param_groups for p in group["params"]]
        assert sum(p.numel() for p in trainable) == LORA_PARAMS  # the optimizer holds nothing else
        samples = fixed_samples()
        start = learner.named_parameters()
        rl_step(learner, samples)
        one = learner.named_parameters()
        rl_step(learner, samples)
        two = learner.named_parameters()
    finally:
        learner.shutdown()
    base = [n for n in start if ".lora_" not in n]
    assert len(base) == 21 and all(torch.equal(start[n], two[n]) for n in base)  # bit-identical
    # B starts at 0, so A's first gradient is 0 and the first step moves B only; then both
    moved = lambda a, b: sorted(n for n in a if not torch.equal(a[n], b[n]))  # noqa: E731
    assert moved(start, one) == sorted(n for n in start if ".lora_B." in n)
    assert moved(one, two) == sorted(n for n in start if ".lora_" in n)


@pytest.mark.parametrize("packing, checkpointing", [("padded", False), ("packed", True)])
def test_reference_is_the_initial_model(model_dir, packing, checkpointing):
    # adapter dropout: the reference pass must switch off dropout too, as a frozen copy would
    learner = lora_learner(
        model_dir, lora={"r": 4, "dropout": 0.3}, packing=packing, gradient_checkpointing=checkpointing
    )
    try:
        samples = fixed_samples()
        for _ in range(2):
            rl_step(learner, samples)
        out = learner.logprobs([samples], with_ref=True)
        initial = initial_logprobs(model_dir, learner, samples)
        # in train mode, as ASFT's and the preference losses' reference passes run
        inputs = learner._inputs(collate(samples, 0, learner.packed))
        attention = {k: v for k, v in inputs.items() if k not in ("targets", "temperature")}
        train_ref = learner.ref.hidden_states(**attention)
        lm = learner.engine.module.lm
        assert lm.training  # restored after the reference pass
        assert all(p.requires_grad for n, p in lm.named_parameters() if ".lora_" in n)
        with torch.no_grad():
            init_hidden = PolicyModel(load_model(model_dir), 1024).eval().hidden_states(**attention)
    finally:
        learner.shutdown()
    assert torch.equal(out["ref_logp"], initial)  # bit for bit, not a copy
    assert torch.equal(train_ref, init_hidden)
    assert (out["logp"] - initial).abs().max() > 0.05  # while the policy moved


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_merged_weights_are_the_adapted_model(model_dir, tmp_path, engine):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = lora_learner(model_dir, rollout={"engine": engine})
    samples = fixed_samples()
    sizes = [s.num_tokens for s in samples]
    worker = RolloutWorker(str(model_dir), learner.cfg.rollout, "float32", seed=0, rank=0)
    try:
        for _ in range(3):
            rl_step(learner, samples)
        learner_logp = learner.logprobs([samples])["logp"].split(sizes)
        ids = torch.tensor([s.prompt_ids + s.response_ids for s in samples[:1]])
        with torch.no_grad():
            peft_logits = learner.adapter(input_ids=ids).logits  # peft's own forward
        weights = learner.export_weights()
        learner.save_pretrained(str(tmp_path / "final"))
        # the rollout engine loads them strictly by name and samples from the current policy
        sequences = [s.prompt_ids + s.response_ids for s in samples]
        engine_before = worker.sequence_logprobs(sequences)
        worker.update_weights(weights)
        engine_logp = worker.sequence_logprobs(sequences)
    finally:
        worker.shutdown()
        learner.shutdown()
    plain = load_model(model_dir)
    assert set(weights) == set(plain.state_dict())
    plain.load_state_dict(weights, strict=True)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # no peft involved
    adapter = PeftModel.from_pretrained(load_model(model_dir), tmp_path / "final" / "adapter")
    with torch.no_grad():
        merged_logits = plain(input_ids=ids).logits
        assert torch.equal(saved(input_ids=ids).logits, merged_logits)
        reloaded_adapter_logits = adapter(input_ids=ids).logits
    # W + s B A in one matrix vs x W + s (x A) B: fp32 rounding only (1.5e-7 measured)
    assert (merged_logits - peft_logits).abs().max() < 1e-6
    assert torch.equal(reloaded_adapter_logits, peft_logits)
    # the learner's chunked log-probs are peft's forward's (2.4e-7 measured)
    peft_logp = peft_logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[-sizes[0] :, 0]
    assert (learner_logp[0] - peft_logp).abs().max() < 1e-6
    moved = 0.0
    for s, lp, before, after in zip(samples, learner_logp, engine_before, engine_logp):
        assert (torch.tensor(after[-s.num_tokens :]) - lp).abs().max() < 1e-5
        moved = max(moved, (torch.tensor(before[-s.num_tokens :]) - lp).abs().max().item())
    assert moved > 0.1  # three steps took the policy far from the initial model


def test_target_modules_that_match_nothing_name_the_key(model_dir, tmp_path):
    sft_data, _ = write_data(tmp_path)
    expected = (
        "key 'learner.lora.target_modules': lm_head, mlp.gate match no linear module of "
        "the model, or its output head 'lm_head', which cannot be adapted (names match "
        "whole or as a dotted suffix); its other linear modules: q_proj, k_proj, v_proj, "
        "o_proj, gate_proj, up_proj, down_proj"
    )
    bad = "learner.lora.target_modules=[gate_proj, lm_head, mlp.gate]"
    with pytest.raises(ConfigError) as rl:  # when the config loads: nothing has started
        load_config(ROOT / "tests" / "configs" / "tiny.yaml", [bad])
    with pytest.raises(ConfigError) as sft:
        load_offline_config(
            "sft",
            CONFIGS / "sft_tiny.yaml",
            [f"data.path={sft_data}", "model.kind=hf", f"model.path={model_dir}", bad],
        )
    for error in (rl, sft):
        assert str(error.value).endswith(expected) and "(with overrides): key" in str(error.value)
    with pytest.raises(ConfigError) as setup:  # and at learner setup, for any model kind
        lora_learner(model_dir, lora={"target_modules": ["gate_proj", "lm_head", "mlp.gate"]})
    assert str(setup.value) == expected
    # the offline configs take the section from LearnerConfig, defaults included
    cfg = load_offline_config("sft", CONFIGS / "sft_tiny.yaml", [f"data.path={sft_data}", "learner.lora.r=4"])
    assert cfg.learner.lora.model_dump() == {
        "r": 4,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
    }
    assert (
        load_offline_config("sft", CONFIGS / "sft_tiny.yaml", [f"data.path={sft_data}"]).learner.lora is None
    )


def test_sft_with_lora_trains_and_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    sft_data, _ = write_data(tmp_path)
    _, run = run_job("sft", tmp_path / "sft", f"data.path={sft_data}", "learner.lora.r=4")
    metrics = read_metrics(run)
    assert metrics[8]["eval/nll"] < metrics[0]["eval/nll"] - 0.2  # 4.699 -> 4.377 measured
    final = run / "final_model"
    _, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not any(info.values()), info  # every weight of a plain model, nothing else
    assert (final / "adapter" / "adapter_config.json").is_file()


def test_rl_with_lora_syncs_the_merged_policy(tmp_path):
    # a length reward gives the groups different rewards (the tiny model's answers are all
    # wrong so far); kl_coef: the reference (the adapter off) takes part in the loss
    run = run_train(
        tmp_path,
        "learner.lora.r=4",
        "steps=2",
        "eval_every=0",
        "warmup.steps=4",
        "algorithm.kl_coef=0.1",
        "reward.components=[{name: task}, {name: length, args: {target: 2, tolerance: 2}}]",
    )
    metrics = read_metrics(run)
    assert metrics[1]["grad_norm"] > 1e-2
    # step 2 samples from a policy 1e-4 nats of KL away from the warm-up model the engine
    # started with, and the engine's log-probs are the learner's: the merged weights synced
    assert metrics[2]["kl_ref"] > 1e-5
    for step in (1, 2):
        assert metrics[step]["logprob_gap/rollout_vs_learner_max"] < 1e-5  # 4.8e-7 measured
    # the warm-up trains an adapter too; RL starts from its merged model
    assert (run / "models" / "warmup" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow  # three CLI runs (40 s), as test_offline_runs' resume test
def test_resumed_lora_dpo_run_repeats_the_uninterrupted_one(tmp_path):
    _, pair_data = write_data(tmp_path)
    common = [f"data.path={pair_data}", "learner.lora.r=4", "save_every=2"]
    _, full = run_job("dpo", tmp_path / "full", *common, "steps=4")
    _, part = run_job("dpo", tmp_path / "part", *common, "steps=2")
    out, resumed = run_job("dpo", tmp_path / "part", f"resume={part}", "steps=4")
    assert f"resumed {part} after step 2" in out
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    assert a[4]["eval/rewards/margin"] != 0  # the adapter moved the policy off the reference
    assert_same_metrics(a, b, a)
