"""Rows of a data file, whatever its format: a `.jsonl` file, a `.parquet` file or a
directory written by `datasets.save_to_disk`, read one record at a time; and the report of
the rows a loader skipped.

Row numbers count from 0: row N is `dataset[N]` of a Parquet file or HF dataset, and the
(N+1)-th non-blank line of a JSONL file. A JSONL line that is not valid JSON is read as a
`BadRow` in its place (so the rows after it keep their numbers); what becomes of a bad row
is the caller's choice: the loaders skip it and count it in a `DataReport`, or under
strict=True stop with an error naming the file and the row.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".parquet")  # and directories written by datasets.save_to_disk


class PreferenceDataError(ValueError):
    """A dataset that cannot be read, or a bad row under strict=True (preference and SFT
    data alike); its message names the file (and the row)."""


class BadRow(Exception):
    """A row that cannot be used: `reason` names the kind of fault, `detail` this row's."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class DataReport:
    """What a loader made of one file: its rows, and those skipped by reason."""

    path: str
    rows: int = 0
    unit: str = "pairs"  # what a kept row is, in the summary
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> rows
    first: dict[str, str] = field(default_factory=dict)  # reason -> "row N: detail" of its first row
    boundary_moved: list[int] = field(default_factory=list)  # kept; see rlpost/data/datasets.py

    @property
    def kept(self) -> int:
        return self.rows - sum(len(rows) for rows in self.skipped.values())

    def skip(self, row: int, bad: BadRow) -> None:
        self.skipped.setdefault(bad.reason, []).append(row)
        self.first.setdefault(bad.reason, f"row {row}: {bad.detail}")

    def order(self, reasons: Iterable[str]) -> None:
        """Lists the reasons in the order of `reasons` (the order their checks apply)."""
        self.skipped = {r: self.skipped[r] for r in reasons if r in self.skipped}
        self.first = {r: self.first[r] for r in self.skipped}

    def strict_error(self) -> PreferenceDataError | None:
        """The error strict=True raises at the first skipped row (None: none skipped)."""
        if not self.skipped:
            return None
        reason = min(self.skipped, key=lambda r: self.skipped[r][0])
        row, _, detail = self.first[reason].partition(": ")
        return PreferenceDataError(f"{self.path}: {row}: {reason}: {detail}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> DataReport:
        return cls(**value)

    def summary(self, first: int = 5) -> str:
        def rows(ids: list[int]) -> str:
            shown = ", ".join(map(str, ids[:first])) + (", ..." if len(ids) > first else "")
            return f"row{'s' if len(ids) > 1 else ''} {shown}"

        line = f"{self.path}: {self.rows} rows, {self.kept} {self.unit} kept"
        if self.skipped:
            line += f", {self.rows - self.kept} skipped: " + "; ".join(
                f"{reason} {len(ids)} ({rows(ids)})" for reason, ids in self.skipped.items()
            )
        if self.boundary_moved:
            line += (
                f"; prompt/response boundary moved in {len(self.boundary_moved)} "
                f"({rows(self.boundary_moved)})"
            )
        return line


def jsonable(value: Any) -> Any:
    """JSON for the values a Parquet file or HF dataset may hold that json cannot write."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return str(value)  # Decimal, UUID, ...


def _jsonl_rows(path: Path) -> Iterator[dict | BadRow]:
    """A line that is not JSON is a bad row; a file that is not UTF-8 text, or a line that
    Python's reader cannot take (nested past its recursion limit, an integer of more than
    `sys.get_int_max_str_digits()` digits) is an error naming the file and the row: such a
    file is not the data it claims to be."""
    with path.open("rb") as f:
        row = 0
        for raw in f:
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PreferenceDataError(
                    f"{path}: row {row}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start}); "
                    "re-encode the file as UTF-8"
                ) from None
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow("invalid_json", str(e))
            except RecursionError:
                raise PreferenceDataError(f"{path}: row {row}: JSON nested too deeply to read") from None
            except ValueError as e:  # int('9' * 5000): the interpreter's digit limit
                raise PreferenceDataError(f"{path}: row {row}: {one_line(e)}") from None
            row += 1


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of at most `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer (the default) keeps every row group's buffers read so far until the
        # iteration ends: a 1M-row file held ~130 MB by its end; without it, one row group
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise PreferenceDataError(f"{path}: not a readable Parquet file ({one_line(e)})") from None


def _hf_rows(path: Path, split: str | None) -> Iterator[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise PreferenceDataError(
            f"{path}: not a directory written by datasets.save_to_disk ({one_line(e)})"
        ) from None
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
