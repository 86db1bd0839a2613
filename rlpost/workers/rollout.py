"""A rollout worker: one inference engine (vLLM or transformers), as a Ray actor or in-process."""

from __future__ import annotations

from rlpost.algorithms.base import SamplingRule
from rlpost.config.sections import RolloutConfig
from rlpost.engines.base import Completion
from rlpost.workers.clock import ComputeClock
from rlpost.workers.threads import set_threads


def make_engine(model_dir: str, cfg: RolloutConfig, dtype: str, seed: int):
    if cfg.engine == "vllm":
        from rlpost.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, cfg, dtype=dtype, seed=seed)
    from rlpost.engines.hf_engine import HFEngine

    return HFEngine(model_dir, cfg, dtype=dtype, seed=seed)


class RolloutWorker:
    def __init__(self, model_dir: str, cfg: RolloutConfig, dtype: str, seed: int, rank: int):
        set_threads("rollout")
        self.rank = rank
        self.engine = make_engine(model_dir, cfg, dtype, seed)
        # engines hand back host lists, so no CUDA barrier is needed around them
        self.clock = ComputeClock()

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        rule: SamplingRule | None = None,
    ) -> list[list[Completion]]:
        with self.clock("generate"):
            groups = self.engine.generate(prompts, n, temperature, top_p, max_new_tokens, seed, rule)
        for group in groups:
            for c in group:
                c.weight_version = self.engine.weight_version
        return groups

    def generate_timed(self, *args) -> tuple[list[list[Completion]], float]:
        """`generate`, with its seconds returned instead of kept for `take_compute_times`:
        the streaming feeder (rlpost/jobs/streaming.py) accounts for them, since asking the
        worker would wait behind the generation it is in."""
        groups = self.generate(*args)
        return groups, self.clock.take().get("generate", 0.0)

    # ----- weights: the engine's half of rlpost/engines/weight_sync.py --------------------
    def weight_ranks(self) -> int:
        return self.engine.weight_ranks()

    def open_weights(
        self, plan: list, address: str, port: int, rank: int, world_size: int, timeout_s: float, ipc: bool
    ):
        self.engine.open_weights(plan, address, port, rank, world_size, timeout_s, ipc)

    def receive_weights(self) -> int:
        return self.engine.receive_weights()

    def load_weights(self, version: int, buckets) -> None:
        self.engine.load_weights(version, buckets)

    def update_weights(self, state_dict) -> None:
        self.engine.update_weights(state_dict)

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.engine.sequence_logprobs(sequences)

    def take_compute_times(self) -> dict[str, float]:
        return self.clock.take()

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        self.engine.close()

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (None in-process): placement tests ask."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def sleep(self, level: int) -> None:
        """The engine's GPU memory freed at vLLM sleep `level` (rlpost/jobs/colocation.py)."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        return self.engine.wake_up(tags)
