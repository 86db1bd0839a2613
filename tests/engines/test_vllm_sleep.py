"""`rollout.vllm.sleep_level` reaches vLLM as `enable_sleep_mode`: on a platform without
sleep mode (the CPU build) vLLM itself refuses the engine while validating its model
config, before loading anything. The sleep and wake-up calls have not run here: they need
CUDA, ROCm or XPU. Slow tier: imports vLLM's engine."""

from __future__ import annotations

import pytest

from rlpost.config.sections import ModelConfig, RolloutConfig
from rlpost.model.load import materialise_initial_model

pytestmark = pytest.mark.slow


def test_sleep_level_asks_vllm_for_sleep_mode(tmp_path, monkeypatch):
    platforms = pytest.importorskip("vllm.platforms")
    if platforms.current_platform.is_sleep_mode_available():
        pytest.skip("this machine's vLLM has sleep mode")
    from rlpost.engines.vllm_engine import VLLMEngine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model = materialise_initial_model(
        ModelConfig(hidden_size=128, intermediate_size=256),
        "0123456789+=",
        seed=0,
        out_dir=tmp_path,
        max_len=64,
    )
    cfg = RolloutConfig(engine="vllm", vllm={"sleep_level": 1, "max_model_len": 64})
    with pytest.raises(Exception, match="Sleep mode is not supported on current platform"):
        VLLMEngine(str(model), cfg, in_process=True)
