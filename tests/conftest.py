"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The small Llama (hidden 64, 2 layers) most learner tests train, built from seed 0; a
    module that needs another shape or alphabet defines its own `model_dir`."""
    from rlpost.config.sections import ModelConfig
    from rlpost.model.load import materialise_initial_model

    return materialise_initial_model(
        ModelConfig(hidden_size=64, intermediate_size=128),
        "0123456789+=",
        seed=0,
        out_dir=tmp_path_factory.mktemp("model"),
        max_len=64,
    )
