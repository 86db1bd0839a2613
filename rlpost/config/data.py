"""The `data:` and `eval:` sections: prompts read from your files, and how they are evaluated.

```yaml
data:
  train_files: data/train.parquet          # one file, a list, or a glob
  eval_files: [data/gsm8k_test.parquet, data/math500.jsonl]
  prompt_key: prompt                       # text, or a list of chat messages
  answer_key: reward_model.ground_truth    # dotted paths reach into nested fields
  source_key: data_source
  max_prompt_length: 1024                  # tokens after the chat template
eval:
  n: 8                                     # samples per problem: mean@k, pass@k, maj@k
```

The defaults read verl's Parquet format with no further keys. With no `train_files` the
prompts come from the task's generator (`task:`), as before.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from rlpost.config.sections import Section

Files = str | list[str]


class DataConfig(Section):
    train_files: Files | None = Field(
        None, description="training prompts: .jsonl, .parquet or datasets.save_to_disk dirs; None: the task's"
    )
    eval_files: Files | None = Field(
        None, description="evaluation sets, one per file (named by its stem); None: the task's held-out draw"
    )
    prompt_key: str = Field("prompt", description="the prompt: text or chat messages (dotted path)")
    answer_key: str = Field(
        "reward_model.ground_truth", description="the answer rewards check against (a string; dotted path)"
    )
    source_key: str = Field(
        "data_source", description="the row's source, which routes its reward and splits metrics"
    )
    default_source: str | None = Field(
        None, description="source of rows without source_key; None: the file's name without suffix"
    )
    split: str | None = Field(None, description="split of a saved DatasetDict; None: train")
    max_prompt_length: int | None = Field(
        None, gt=0, description="longer prompts (tokens after the chat template) are skipped; None: no limit"
    )
    strict: bool = Field(False, description="the first bad row is an error instead of skipped and reported")

    @field_validator("train_files", "eval_files")
    @classmethod
    def _not_empty(cls, files: Files | None) -> Files | None:
        if files is not None and not (files if isinstance(files, list) else files.strip()):
            raise ValueError("name at least one file (or leave the key out)")
        return files

    @field_validator("prompt_key", "answer_key", "source_key")
    @classmethod
    def _dotted_path(cls, key: str) -> str:
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"{key!r} is not a field name or a dotted path like reward_model.ground_truth")
        return key


class EvalConfig(Section):
    """Evaluation: greedy accuracy always; with n > 1 also n samples per problem."""

    n: int = Field(1, gt=0, description="sampled completions per problem (mean@k, pass@k, maj@k for k <= n)")
    temperature: float | None = Field(None, gt=0, description="of the sampled completions; None: rollout's")
    top_p: float | None = Field(None, gt=0, le=1, description="of the sampled completions; None: rollout's")
    max_problems: int | None = Field(None, gt=0, description="the first N problems of each set; None: all")
    ks: list[int] | None = Field(
        None, description="the k of pass@k and maj@k; None: 1, 2, 4, ... up to n, and n"
    )

    @model_validator(mode="after")
    def _check_ks(self) -> EvalConfig:
        for k in self.ks or ():
            if not 1 <= k <= self.n:
                raise ValueError(f"eval.ks: k = {k} must be between 1 and eval.n ({self.n})")
        return self

    def k_values(self) -> list[int]:
        if self.ks is not None:
            return sorted(set(self.ks))
        ks = [1 << i for i in range(self.n.bit_length()) if 1 << i <= self.n]
        return sorted({*ks, self.n})
