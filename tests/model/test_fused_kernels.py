"""learner.fused_kernels: when Liger's kernels are used, and the errors when they cannot be.

The kernels themselves are Triton (CUDA); their results against the eager model are
checked in tests/test_gpu.py."""

from __future__ import annotations

import pytest

from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from rlpost.model import fused_kernels
from rlpost.model.fused_kernels import use_fused_kernels
from tests.run_helpers import TINY


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
        )
    )


def test_off_and_auto_leave_a_cpu_learner_alone():
    lm = tiny_llama()
    forwards = [type(m).forward for m in lm.modules()]
    assert not use_fused_kernels("off", lm, on_gpu=True)
    assert not use_fused_kernels("auto", lm, on_gpu=False)
    assert [type(m).forward for m in lm.modules()] == forwards


def test_liger_on_cpu_is_an_error():
    with pytest.raises(RuntimeError, match="fused_kernels=liger needs a CUDA learner"):
        use_fused_kernels("liger", tiny_llama(), on_gpu=False)


def test_without_the_package_auto_falls_back_and_liger_says_how_to_install(monkeypatch):
    monkeypatch.setattr(fused_kernels, "liger_installed", lambda: False)
    assert not use_fused_kernels("auto", tiny_llama(), on_gpu=True)
    with pytest.raises(RuntimeError, match="pip install liger-kernel"):
        use_fused_kernels("liger", tiny_llama(), on_gpu=True)


def test_config_check_names_the_key_before_start_up(monkeypatch):
    monkeypatch.setattr(fused_kernels, "liger_installed", lambda: False)
    assert load_config(TINY, ["learner.fused_kernels=off"]).learner.fused_kernels == "off"
    expected = (
        rf"{TINY} \(with overrides\): key 'learner.fused_kernels': liger needs the "
        r"liger-kernel package: pip install liger-kernel"
    )
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY, ["learner.fused_kernels=liger"])
    with pytest.raises(ConfigError, match="learner.fused_kernels"):
        load_config(TINY, ["learner.fused_kernels=triton"])


def test_unsupported_model_type(monkeypatch):
    """Where the package is installed: a model type Liger has no kernels for."""
    pytest.importorskip("liger_kernel")
    lm = tiny_llama()
    lm.config.model_type = "not-a-model"
    assert not use_fused_kernels("auto", lm, on_gpu=True)
    with pytest.raises(RuntimeError, match="no kernels for model type 'not-a-model'"):
        use_fused_kernels("liger", lm, on_gpu=True)


def test_bare_on_and_off_are_read_as_words_not_booleans(tmp_path):
    """YAML 1.1 reads a bare off as False: in a file and in an override alike."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        TINY.read_text()
        .replace("eval_size: 16}", "eval_size: 16, chat_template: off}")
        .replace("epochs: 2}", "epochs: 2, fused_kernels: off}")
    )
    loaded = load_config(cfg)
    assert loaded.task.chat_template == "off" and loaded.learner.fused_kernels == "off"
    assert load_config(TINY, ["task.chat_template=on"]).task.chat_template == "on"
