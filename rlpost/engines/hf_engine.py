"""Rollout with transformers `generate`: no extra dependency, fast for tiny models."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from rlpost.algorithms.base import SamplingRule
from rlpost.engines.base import Completion
from rlpost.model.load import load_model


class _AdaptiveTemperature(LogitsProcessor):
    def __init__(self, temperature: float, rule: SamplingRule):
        self.temperature, self.rule = temperature, rule

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.rule.apply(scores / self.temperature)


class HFEngine:
    def __init__(self, model_dir: str, cfg=None, dtype: str = "float32", seed: int = 0):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_dir, dtype).to(self.device).eval()
        gen = self.model.generation_config
        self.eos_id, self.pad_id = gen.eos_token_id, gen.pad_token_id
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        if self.pad_id is None:
            self.pad_id = self.eos_id

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
        sampling = {"temperature": None if greedy else temperature, "top_p": None if greedy else top_p}
        if rule is not None and not greedy:
            # generate's own warpers would run before a custom processor; ours does the
            # temperature and then top-p, vLLM's order.
            processors = [_AdaptiveTemperature(temperature, rule)]
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
            sampling = {
                "temperature": 1.0,
                "top_p": None,
                "logits_processor": LogitsProcessorList(processors),
            }
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=not greedy,
            top_k=None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=1 if greedy else n,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
            **sampling,
        )
        new = out.sequences[:, width:].cpu()
        # scores are the processed (temperature / top-p) logits the tokens were drawn from
        logps = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu()
        logps = logps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        completions = []
        for row, lp in zip(new.tolist(), logps.tolist()):
            length = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            completions.append(
                Completion(ids=row[:length], logprobs=lp[:length], truncated=self.eos_id not in row[:length])
            )
        per = 1 if greedy else n
        groups = [completions[i * per : (i + 1) * per] for i in range(len(prompts))]
        return [g * n for g in groups] if greedy else groups

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        out = []
        for seq in sequences:
            ids = torch.tensor([seq], device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            out.append(logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
        return out

    def close(self) -> None:
        pass
