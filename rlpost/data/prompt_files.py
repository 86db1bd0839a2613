"""RL prompt datasets read from your files (the `data:` section), each converted once into a
cached Arrow file and memory-mapped from then on.

Formats: `.jsonl`, `.parquet` and `datasets.save_to_disk` directories (rlpost/data/rows.py,
which also numbers the rows). Fields, by the DataConfig keys (dotted paths reach into nested
objects; a record that has the whole dotted key as one field name gets that field): the
prompt (text, or a non-empty list of {"role": str, "content": str} messages), the answer (a
string) and the source (a string; where the record has none, or null: data.default_source,
else the file's name without its suffix). Message keys whose value is null are dropped: a
Parquet list of structs gives every message every key of the column's type, and a chat
template would see `tool_calls: None` as defined.

A bad row is skipped with the first reason of `REASONS` that applies, counted in the file's
`DataReport`; with data.strict the first one is an error naming the file and the row.

The cache: one entry per file, `<cache>/<key>/` holding `prompts.arrow` (Arrow IPC, one
record batch per `BATCH` rows read) and `report.json`. The key hashes the file's resolved
path, size and mtime_ns (every file's, for a directory), the DataConfig keys that shape the
rows, and, only where data.max_prompt_length is set (the one check that tokenizes), the
tokenizer (name_or_path, length, BOS, chat template), task.chat_template,
task.system_prompt and the limit. data.strict is not: the report lists the rows skipped,
so a strict load of a lenient entry raises the error its conversion would have. An entry
is written to a temporary directory and renamed into place, so a killed conversion leaves
no entry. Editing a file changes its key; old entries are not deleted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rlpost.config.data import DataConfig
from rlpost.config.sections import TaskConfig
from rlpost.data.prompts import beyond_context, model_context, prompt_lengths, template_missing
from rlpost.data.rows import SUFFIXES, BadRow, DataReport, PreferenceDataError, jsonable, read_rows
from rlpost.errors import ConfigError
from rlpost.files import write_json
from rlpost.rewards.base import Problem

REASONS = {
    "invalid_json": "the line is not valid JSON",
    "missing_field": "the prompt or the answer is missing or null",
    "malformed": "not an object, a prompt neither text nor chat messages, or a source not text",
    "empty_prompt": "the prompt is blank",
    "bad_answer": "the answer is not a string",
    "too_long": "the prompt is longer than data.max_prompt_length tokens (chat template included), "
    "or, with no limit set, leaves the model no position for a response (`model_context`)",
}
SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # in its file, as rows.py numbers them
        ("source", pa.string()),
        ("prompt", pa.string()),  # the text, or the messages as JSON
        ("messages", pa.bool_()),  # whether `prompt` is JSON of messages
        ("answer", pa.string()),
        ("fields", pa.string()),  # the whole record as JSON
    ]
)
BATCH = 4096
VERSION = 1  # of the cache's layout and rules: a change makes every entry stale
_ABSENT = object()


def resolve_files(spec: str | list[str] | None, key: str) -> list[Path]:
    """The files of a `data.*_files` value: one path, a list, or glob patterns (their
    matches sorted), in the order given; a file named twice is read once."""
    found: dict[Path, None] = {}
    for item in [spec] if isinstance(spec, str) else spec or []:
        name = os.path.expanduser(item)
        if glob.has_magic(name):
            matches = sorted(glob.glob(name, recursive=True))
            if not matches:
                raise ConfigError(f"key {key!r}: no file matches {item!r}")
        elif os.path.exists(name):
            matches = [name]
        else:
            raise ConfigError(f"key {key!r}: no such file or directory: {item!r}")
        for match in map(Path, matches):
            if not match.is_dir() and match.suffix not in SUFFIXES:
                raise ConfigError(
                    f"key {key!r}: {match}: expected .jsonl, .parquet or a datasets.save_to_disk directory"
                )
            found.setdefault(match)
    return list(found)


# ----- checking a row --------------------------------------------------------------------


def _get(record: dict, key: str) -> Any:
    if key in record:
        return record[key]
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _messages(value: list) -> list[dict] | None:
    """The messages with their null keys dropped, or None if `value` is not messages."""
    if not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return None
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _fields(record: Any, cfg: DataConfig, default_source: str) -> tuple[str, str | list, str]:
    """source, prompt and answer of a record (raises BadRow)."""
    if not isinstance(record, dict):
        raise BadRow("malformed", f"a record must be an object, got {type(record).__name__}")
    prompt, answer = _get(record, cfg.prompt_key), _get(record, cfg.answer_key)
    for key, value in ((cfg.prompt_key, prompt), (cfg.answer_key, answer)):
        if value is _ABSENT:
            raise BadRow("missing_field", f"no {key!r}")
        if value is None:
            raise BadRow("missing_field", f"{key!r} is null")
    if isinstance(prompt, list):
        if (prompt := _messages(prompt)) is None:
            raise BadRow(
                "malformed",
                f"{cfg.prompt_key!r} must be text or a non-empty list of "
                "{'role': str, 'content': str} messages",
            )
    elif not isinstance(prompt, str):
        raise BadRow("malformed", f"{cfg.prompt_key!r} is {_short(prompt)}, not text or messages")
    source = _get(record, cfg.source_key)
    if source is _ABSENT or source is None:
        source = default_source
    elif not isinstance(source, str):
        raise BadRow("malformed", f"{cfg.source_key!r} is {_short(source)}, not a string")
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    if not text.strip():
        raise BadRow("empty_prompt", f"{cfg.prompt_key!r} is blank")
    if not isinstance(answer, str):
        raise BadRow("bad_answer", f"{cfg.answer_key!r} is {_short(answer)}, not a string")
    return source, prompt, answer


# ----- converting a file -----------------------------------------------------------------


class _Converter:
    """Checks a file's rows and writes the kept ones to an Arrow file, `BATCH` at a time."""

    def __init__(self, path: Path, out: Path, cfg: DataConfig, tokenizer, task: TaskConfig):
        self.path, self.cfg, self.tokenizer, self.task = path, cfg, tokenizer, task
        self.context = model_context(tokenizer) if cfg.max_prompt_length is None else None
        self.report = DataReport(str(path), unit="prompts")
        self.pending: list[tuple] = []  # row, source, prompt, answer, the record as JSON
        self.writer = pa.ipc.new_file(str(out), SCHEMA)

    def run(self) -> DataReport:
        default_source = self.cfg.default_source or self.path.stem
        with self.writer:
            for row, record in enumerate(read_rows(self.path, self.cfg.split)):
                self.report.rows += 1
                try:
                    if isinstance(record, BadRow):
                        raise record
                    fields = _fields(record, self.cfg, default_source)
                    # JSON now: a few hundred bytes where the record's objects take kilobytes
                    self.pending.append(
                        (row, *fields, json.dumps(record, ensure_ascii=False, default=jsonable))
                    )
                except BadRow as bad:
                    if self.cfg.strict:
                        self.flush()  # a too_long row before this one is the first bad row
                    self.skip(row, bad)
                if len(self.pending) == BATCH:
                    self.flush()
            self.flush()
        self.report.order(REASONS)
        return self.report

    def skip(self, row: int, bad: BadRow) -> None:
        if self.cfg.strict:
            raise PreferenceDataError(f"{self.path}: row {row}: {bad.reason}: {bad.detail}")
        self.report.skip(row, bad)

    def flush(self) -> None:
        rows, self.pending = self.pending, []
        if not rows:
            return
        limit = self.cfg.max_prompt_length
        if limit is not None:
            talk = next((r[0] for r in rows if isinstance(r[2], list)), None)
            if talk is not None:
                _need_template(self.path, self.tokenizer, self.task, talk)
            lengths = prompt_lengths(self.tokenizer, [r[2] for r in rows], self.task)
            kept = []
            for r, n in zip(rows, lengths):
                if n > limit:
                    self.skip(r[0], BadRow("too_long", f"{n} tokens > max_prompt_length {limit}"))
                else:
                    kept.append(r)
            rows = kept
        elif self.context is not None:
            rows = self.fitting(rows)
        if not rows:
            return
        columns = list(zip(*rows))
        prompts = [p if isinstance(p, str) else json.dumps(p, ensure_ascii=False) for p in columns[2]]
        self.writer.write_batch(
            pa.RecordBatch.from_arrays(
                [
                    pa.array(columns[0], pa.int64()),
                    pa.array(columns[1], pa.string()),
                    pa.array(prompts, pa.string()),
                    pa.array([isinstance(p, list) for p in columns[2]], pa.bool_()),
                    pa.array(columns[3], pa.string()),
                    pa.array(columns[4], pa.string()),
                ],
                schema=SCHEMA,
            )
        )

    def fitting(self, rows: list[tuple]) -> list[tuple]:
        """With no data.max_prompt_length: the rows whose prompt leaves the model a position
        for a response (a 10 MB row is skipped, not run); see `beyond_context`."""
        too_long = beyond_context(self.tokenizer, [r[2] for r in rows], self.task, self.context)
        for i, n in too_long.items():
            detail = f"{n} tokens >= the model's {self.context} positions (max_position_embeddings)"
            self.skip(rows[i][0], BadRow("too_long", detail))
        return [r for i, r in enumerate(rows) if i not in too_long]


def _need_template(path: Path, tokenizer, task: TaskConfig, row: int) -> None:
    if (why := template_missing(tokenizer, task)) is not None:
        raise PreferenceDataError(
            f"{path}: row {row}: a conversational prompt needs the chat template, and {why}"
        )


def _stats(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path)) if path.is_dir() else "", *_size_mtime(p)] for p in files]


def _size_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def cache_key(path: Path, cfg: DataConfig, tokenizer, task: TaskConfig) -> str:
    """The name of `path`'s cache entry (see the module docstring)."""
    keys = ("prompt_key", "answer_key", "source_key", "default_source", "split", "max_prompt_length")
    what: dict[str, Any] = {
        "version": VERSION,
        "path": str(path.resolve()),
        "stats": _stats(path),
        "data": {k: getattr(cfg, k) for k in keys},
    }
    context = model_context(tokenizer) if cfg.max_prompt_length is None else None
    if context is not None:  # prompts that cannot fit are skipped, tokenized by this tokenizer
        what["context"] = context
    if cfg.max_prompt_length is not None or context is not None:
        what["tokenizer"] = [
            getattr(tokenizer, "name_or_path", ""),
            len(tokenizer),
            tokenizer.bos_token_id,
            getattr(tokenizer, "chat_template", None),
        ]
        what["task"] = [task.chat_template, task.system_prompt]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def _cached(path: Path, root: Path, cfg: DataConfig, tokenizer, task: TaskConfig) -> tuple[Path, DataReport]:
    """The Arrow file of `path`'s entry in `root` (converted first where there is none) and
    the file's report."""
    entry = root / cache_key(path, cfg, tokenizer, task)
    if not (entry / "report.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{entry.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            report = _Converter(path, tmp / "prompts.arrow", cfg, tokenizer, task).run()
            write_json(tmp / "report.json", report.to_json())
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "report.json").exists():  # else another process converted it first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report = DataReport.from_json(json.loads((entry / "report.json").read_text()))
    report.path = str(path)  # one entry serves every spelling of the path
    return entry / "prompts.arrow", report


def _mapped(arrow: Path) -> pa.Table:
    # zero-copy: the table's buffers are the mapped file's pages, read in when touched
    return pa.ipc.open_file(pa.memory_map(str(arrow))).read_all()


class PromptDataset(Sequence):
    """The kept rows of prompt files, in file order: `ds[i]` builds the i-th `Problem` from
    the memory-mapped cache when asked (no list of all rows is ever made). A Sequence, so
    random.sample and iteration take it as they take a list."""

    def __init__(self, files: list[Path], arrows: list[Path], reports: list[DataReport]):
        self.files, self.reports, self._arrows = files, reports, arrows
        self._batches: list[pa.RecordBatch] = []
        self._file_of: list[int] = []  # per batch
        self._starts = [0]  # of each batch, and the end
        for i, arrow in enumerate(arrows):
            for batch in _mapped(arrow).to_batches():
                if batch.num_rows:
                    self._batches.append(batch)
                    self._file_of.append(i)
                    self._starts.append(self._starts[-1] + batch.num_rows)
        self._sources: list[str] | None = None

    @classmethod
    def load(
        cls,
        files: list[Path],
        data_cfg: DataConfig,
        tokenizer,
        task_cfg: TaskConfig,
        cache_dir: Path | None = None,
    ) -> PromptDataset:
        """The prompts of `files` (see `resolve_files`), each converted into the cache on
        its first load: `cache_dir`, else cache_root()/prompts. Raises PreferenceDataError
        naming the file for a file that cannot be read or has no usable row, for a
        conversation where the chat template is off or missing, and under data.strict for
        the first bad row."""
        if cache_dir is None:
            from rlpost.model.load import cache_root

            cache_dir = cache_root() / "prompts"
        arrows, reports = [], []
        for path in map(Path, files):
            arrow, report = _cached(path, Path(cache_dir), data_cfg, tokenizer, task_cfg)
            if data_cfg.strict and (error := report.strict_error()) is not None:
                raise error
            if not report.kept:
                raise PreferenceDataError(f"{path}: no usable row; {report.summary()}")
            talk = next(
                (b for b in _mapped(arrow).to_batches() if pc.any(b.column("messages")).as_py()), None
            )
            if talk is not None:  # (not pc.index: it imports pandas, a third of a second)
                row = pc.filter(talk.column("row"), talk.column("messages"))[0].as_py()
                _need_template(path, tokenizer, task_cfg, row)
            arrows.append(arrow)
            reports.append(report)
        return cls([Path(f) for f in files], arrows, reports)

    def __reduce__(self):
        # another process maps the same cache files rather than receiving the rows
        return PromptDataset, (self.files, self._arrows, self.reports)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> Problem:
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt {i} of {len(self)}")
        i %= len(self)
        b = bisect_right(self._starts, i) - 1
        batch, j = self._batches[b], i - self._starts[b]
        row, source, prompt, talk, answer, fields = (batch.column(k)[j].as_py() for k in range(6))
        return Problem(
            prompt=json.loads(prompt) if talk else prompt,
            answer=answer,
            source=source,
            meta={"fields": json.loads(fields), "file": str(self.files[self._file_of[b]]), "row": row},
        )

    @property
    def sources(self) -> list[str]:
        """The distinct sources of the rows, sorted."""
        if self._sources is None:
            found = set()
            for arrow in self._arrows:
                found.update(pc.unique(_mapped(arrow).column("source")).to_pylist())
            self._sources = sorted(found)
        return self._sources
