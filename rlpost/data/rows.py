"""Rows of a data file, whatever its format: a `.jsonl` file, a `.parquet` file or a
directory written by `datasets.save_to_disk`, read one record at a time.

Row numbers count from 0: row N is `dataset[N]` of a Parquet file or HF dataset, and the
(N+1)-th non-blank line of a JSONL file. A JSONL line that is not valid JSON is read as a
`BadRow` in its place (so the rows after it keep their numbers); what becomes of a bad row
is the caller's choice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


class PreferenceDataError(ValueError):
    """A dataset that cannot be read, or a bad row under strict=True (preference and SFT
    data alike); its message names the file (and the row)."""


class BadRow(Exception):
    """A row that cannot be used: `reason` names the kind of fault, `detail` this row's."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _jsonl_rows(path: Path) -> Iterator[dict | BadRow]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow("invalid_json", str(e))


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hf_rows(path: Path, split: str | None) -> Iterator[dict]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        name = split or ("train" if "train" in data else None)
        if name not in data:
            raise PreferenceDataError(f"{path}: no split {name!r}; splits: {', '.join(data)}")
        data = data[name]
    elif split is not None:
        raise PreferenceDataError(f"{path}: a single dataset with no splits; got split={split!r}")
    yield from data


def read_rows(path: str | Path, split: str | None = None) -> Iterator[dict | BadRow]:
    """The records of a `.jsonl` / `.parquet` file or a `datasets.save_to_disk` directory
    (`split`: of a `DatasetDict`, "train" by default)."""
    path = Path(path)
    if not path.exists():
        raise PreferenceDataError(f"{path}: no such file or directory")
    if path.is_dir():
        return _hf_rows(path, split)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise PreferenceDataError(
        f"{path}: unsupported format; expected .jsonl, .parquet or a "
        "directory written by datasets.save_to_disk"
    )
