"""Per-token adaptive temperature inside vLLM, as a vLLM v1 logits processor.

vLLM builds one instance per engine (`LLM(logits_processors=[...])`); a request
opts in through `SamplingParams.extra_args[RULE_KEY]` (a `TemperatureRule` as a
dict). The processor declares itself argmax-invariant (dividing a row by a
positive number keeps its argmax), so vLLM's sampler runs it after dividing by
the request's temperature and before top-k / top-p: it sees logits / T and
turns them into logits / T_t. With `logprobs_mode="processed_logprobs"` the
log-probs vLLM returns are then those of the distribution actually sampled.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from rlpost.algorithms import sampling_rule_from_dict
from rlpost.algorithms.base import SamplingRule

RULE_KEY = "rlpost_temperature_rule"


class AdaptiveTemperatureProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rules: dict[int, SamplingRule] = {}  # batch row -> the rule of its request

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rules, batch_update, _rule_of)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        by_rule: dict[SamplingRule, list[int]] = {}
        for row, rule in self.rules.items():
            by_rule.setdefault(rule, []).append(row)
        for rule, rows in by_rule.items():  # one rule per rollout batch in practice
            index = torch.tensor(rows, device=logits.device)
            logits[index] = rule.apply(logits[index])
        return logits


def _rule_of(params, _prompt_ids, _output_ids) -> SamplingRule | None:
    d = (params.extra_args or {}).get(RULE_KEY)
    return sampling_rule_from_dict(d) if d is not None else None
