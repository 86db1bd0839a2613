"""Rollout with transformers `generate`: no extra dependency, fast for tiny models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from rlpost.algorithms.base import SamplingRule
from rlpost.engines.base import Completion
from rlpost.engines.weight_sync import (
    Receiver,
    SyncPlan,
    TensorSpec,
    WeightSyncError,
    dtype_name,
    local_buckets,
    unpack,
)
from rlpost.model.load import load_model, load_tokenizer


class _AdaptiveTemperature(LogitsProcessor):
    def __init__(self, temperature: float, rule: SamplingRule):
        self.temperature, self.rule = temperature, rule

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.rule.apply(scores / self.temperature)


class _ChosenLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token under the distribution it was drawn
    from, as the last processor of a step: the next step's `input_ids` end with the token
    drawn from this step's scores. One step's log-softmax is kept at a time, where
    generate's `output_scores` would keep every step's (rows x vocabulary x steps: 8 GB
    for 256 rows of 160 tokens over SmolLM2's 49k vocabulary)."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.take(input_ids[:, -1])
        self.previous = scores.float().log_softmax(-1)
        return scores

    def take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(-1, tokens[:, None]).squeeze(-1).cpu())
            self.previous = None

    def logprobs(self, last: torch.Tensor) -> torch.Tensor:
        """rows x steps, after generate (`last`: the tokens of its final step)."""
        self.take(last)
        return torch.stack(self.chosen, dim=1)


class _StopOnText(StoppingCriteria):
    """Ends a row once its decoded response contains a stop string (vLLM matches the
    response text only). A cheap pre-test picks the rows to decode: transformers'
    StopStringCriteria (tensor ops; it also fires on a stop string that begins in the
    prompt, hence the decode), or, where it cannot be built for the tokenizer, a decode of
    each response's last few tokens. A match the pre-test misses costs generated tokens,
    never correctness: `HFEngine._end` cuts every completion on the full text."""

    def __init__(self, tokenizer, stops: list[str], width: int):
        self.tokenizer, self.stops, self.width = tokenizer, stops, width
        try:
            self.tensor_match = StopStringCriteria(tokenizer, stops)
        except ValueError:  # it probes the vocabulary by encoding "abcdef"
            self.tensor_match = None
        # a stop string's characters come from at most this many tokens, unless some
        # decode to nothing (special tokens, partial characters)
        self.window = max(map(len, stops)) + 2

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        responses = input_ids[:, self.width :].tolist()
        if self.tensor_match is not None:
            rows = self.tensor_match(input_ids, scores).nonzero().flatten().tolist()
        else:
            tails = [r[-self.window :] for r in responses]
            tails = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
            rows = [i for i, tail in enumerate(tails) if _contains(tail, self.stops)]
        hit = torch.zeros(len(responses), dtype=torch.bool, device=input_ids.device)
        for i in rows:
            hit[i] = _contains(self.tokenizer.decode(responses[i], skip_special_tokens=True), self.stops)
        return hit


def _contains(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)


class HFEngine:
    def __init__(self, model_dir: str, cfg=None, dtype: str = "float32", seed: int = 0):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_dir, dtype).to(self.device).eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        # every EOS id of the generation config ends a sequence, as in vLLM
        self.stop_ids = list(dict.fromkeys(eos + list(cfg.stop_token_ids if cfg else [])))
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else (eos or [0])[0]
        self.stop_strings = list(cfg.stop) if cfg else []
        # decoded as vLLM's detokenizer does (special tokens skipped) before matching
        self.tokenizer = load_tokenizer(model_dir) if self.stop_strings else None
        self._params = self.model.state_dict(keep_vars=True)  # tied names share a tensor
        self.receiver: Receiver | None = None  # opened by open_weights
        self.weight_version = 0

    @torch.no_grad()
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
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        greedy = temperature == 0
        # The warpers are ours, in vLLM's order (temperature, then top-p): generate would
        # run its own after any custom processor, and the recorder must see their output.
        processors: list[LogitsProcessor] = []
        if not greedy:
            scale = (
                TemperatureLogitsWarper(temperature)
                if rule is None
                else _AdaptiveTemperature(temperature, rule)
            )
            processors.append(scale)
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        recorder = _ChosenLogprobs()
        sampling = {
            "temperature": None if greedy else 1.0,
            "top_p": None,
            "logits_processor": LogitsProcessorList([*processors, recorder]),
        }
        if self.stop_strings:
            criteria = [_StopOnText(self.tokenizer, self.stop_strings, width)]
            sampling["stopping_criteria"] = StoppingCriteriaList(criteria)
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=not greedy,
            top_k=None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=1 if greedy else n,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.pad_id,
            **sampling,
        )
        new = out[:, width:].cpu()
        logps = recorder.logprobs(out[:, -1])
        completions = []
        for row, lp in zip(new.tolist(), logps.tolist()):
            end = self._end(row)
            # no stop: generate ran the full max_new_tokens for this row (nothing after
            # a row's end is returned: those positions hold padding)
            length = len(row) if end is None else end
            completions.append(Completion(ids=row[:length], logprobs=lp[:length], truncated=end is None))
        per = 1 if greedy else n
        groups = [completions[i * per : (i + 1) * per] for i in range(len(prompts))]
        return [g * n for g in groups] if greedy else groups

    def _end(self, row: list[int]) -> int | None:
        """The completion's length in `row`: through its first stop token id, or through
        the token at which its decoded text first contains a stop string, whichever is
        first; None when neither occurs."""
        end = next((k + 1 for k, tok in enumerate(row) if tok in self.stop_ids), None)
        if not self.stop_strings:
            return end

        def stopped(k: int) -> bool:
            return _contains(self.tokenizer.decode(row[:k], skip_special_tokens=True), self.stop_strings)

        hi = end or len(row)
        if not stopped(hi):
            return end
        lo = 0  # stopped(lo) is False, stopped(hi) True: bisect the first stopped prefix
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if stopped(mid) else (mid, hi)
        return hi

    # ----- weights (rlpost/engines/weight_sync.py) -------------------------------------
    def weight_ranks(self) -> int:
        """Processes of this engine in a transfer group: this one."""
        return 1

    def open_weights(
        self, plan: list, address: str, port: int, rank: int, world_size: int, timeout_s: float, ipc: bool
    ):
        # the loader copies into the parameters: one receive buffer serves every bucket
        self.receiver = Receiver(
            SyncPlan.from_list(plan), torch.device(self.device), self._load, "hf engine", load_keeps=False
        )
        self.receiver.connect(address, port, rank, world_size, timeout_s, ipc)

    def receive_weights(self) -> int:
        self.weight_version = self.receiver.receive()
        return self.weight_version

    def load_weights(
        self, version: int, buckets: Iterable[tuple[Sequence[TensorSpec], torch.Tensor]]
    ) -> None:
        """Buckets handed over in this process (the in-process mode's transport)."""
        for specs, buf in buckets:
            self._load(unpack(specs, buf.to(self.device)))
        self.weight_version = version

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a whole state dict (tests and benchmarks; a run syncs through buckets)."""
        self.load_weights(self.weight_version, local_buckets(state_dict, dtype_name(self.model.dtype)))

    @torch.no_grad()
    def _load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        params = self._params
        for name, tensor in tensors:
            if name not in params:
                raise WeightSyncError(f"hf engine: the learner sent {name!r}, which this model does not have")
            params[name].copy_(tensor)

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        out = []
        for seq in sequences:
            ids = torch.tensor([seq], device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            out.append(logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
        return out

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
