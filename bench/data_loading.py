"""Start-up cost of RL prompts read from files: PromptDataset.load at 10k and 1M rows,
converting (first start) and from its cache (second start), time and memory.

    python bench/data_loading.py                            # 10k and 1M rows, Parquet and JSONL
    python bench/data_loading.py --sizes 10000 --max-prompt-length 0 512

The files are synthetic verl-style rows (data_source, the prompt as one user message of 150
to 400 characters, reward_model.ground_truth, extra_info), written once under --dir; the
Parquet files have row groups of 1,000 rows.
Each start runs in a fresh process: it builds the char tokenizer (with a one-line chat
template, so that --max-prompt-length can render the messages), then measures
PromptDataset.load, `ds.sources` and the first --batches batches of --batch-size prompts
of the epoch stream (the order shuffled, each `ds[i]` a Problem). Memory is the process's
resident set (/proc/self/status): its peak during the start (VmHWM, reset just before)
and what it holds after the load and after the batches (VmRSS), all above the RSS just
before loading, and of the last the anonymous part (RssAnon). The rest is file pages
mapped in (the cache file's pages read, and library code run for the first time): the
page cache's, dropped under memory pressure, not the process's allocations. Reading one
row of the cache maps in up to the kernel's fault-around window (64 KB) around each of
its column values, so a few hundred KB a row read.

--max-prompt-length 0 runs without the limit (nothing tokenized).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _rss_bytes, _vm_hwm_bytes, table  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
SOURCES = ["openai/gsm8k", "math500", "aime24", "numina"]
WORDS = "the of a number sum total each if then find how many what is more less than times".split()


def verl_rows(start: int, count: int) -> list[dict]:
    rng = random.Random(start)
    rows = []
    for i in range(start, start + count):
        question = ""
        while len(question) < rng.randint(150, 400):
            question += f"{rng.choice(WORDS)} {rng.randint(0, 999)} "
        rows.append(
            {
                "data_source": SOURCES[i % len(SOURCES)],
                "prompt": [{"role": "user", "content": question + "Put the answer after ####."}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(rng.randint(0, 10**6))},
                "extra_info": {"split": "train", "index": i},
            }
        )
    return rows


def write_files(root: Path, size: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"parquet": root / f"train_{size}.parquet", "jsonl": root / f"train_{size}.jsonl"}
    if all(f.exists() for f in files.values()):
        return files
    writer = None
    with open(files["jsonl"], "w", encoding="utf-8") as jsonl:
        for start in range(0, size, 10_000):
            rows = verl_rows(start, min(10_000, size - start))
            jsonl.writelines(json.dumps(r) + "\n" for r in rows)
            chunk = pa.Table.from_pylist(rows)
            writer = writer or pq.ParquetWriter(files["parquet"], chunk.schema)
            writer.write_table(chunk, row_group_size=1000)
    writer.close()
    return files


def _anon_bytes() -> int:
    return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(file: str, cache: str, max_prompt_length: int, batches: int, batch_size: int) -> dict:
    """One start, in this (fresh) process."""
    from rlpost.config.data import DataConfig
    from rlpost.config.sections import TaskConfig
    from rlpost.data.prompt_files import PromptDataset
    from rlpost.data.stream import EpochStream
    from rlpost.model.load import char_tokenizer

    tok = char_tokenizer(string.printable)
    tok.chat_template = TEMPLATE
    cfg = DataConfig(max_prompt_length=max_prompt_length or None)
    base, anon = _rss_bytes(), _anon_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    t0 = time.perf_counter()
    ds = PromptDataset.load([Path(file)], cfg, tok, TaskConfig(), Path(cache))
    sources = ds.sources
    t1, loaded = time.perf_counter(), _rss_bytes()
    stream = EpochStream(len(ds), seed=0)
    problems = [ds[i] for _ in range(batches) for i in stream.take(batch_size)]
    t2 = time.perf_counter()
    assert len(problems) == batches * batch_size and len(sources) == len(SOURCES)
    return {
        "load_s": t1 - t0,
        "batches_s": t2 - t1,
        "peak_mb": (_vm_hwm_bytes() - base) / 2**20,
        "loaded_mb": (loaded - base) / 2**20,
        "held_mb": (_rss_bytes() - base) / 2**20,
        "anon_mb": (_anon_bytes() - anon) / 2**20,
        "base_mb": base / 2**20,
        "kept": len(ds),
        "report": ds.reports[0].summary(),
    }


def start(args, file: Path, cache: Path, limit: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(file), "--cache", str(cache), "--limit", str(limit)]
    cmd += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--formats", nargs="+", default=["parquet", "jsonl"])
    ap.add_argument("--max-prompt-length", type=int, nargs="+", default=[0, 512])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dir", type=Path, help="where the files go (kept); default: a temporary dir")
    ap.add_argument("--child")
    ap.add_argument("--cache")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache, args.limit, args.batches, args.batch_size)))
        return

    root = args.dir or Path(tempfile.mkdtemp(prefix="rlpost-data-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        t = time.perf_counter()
        files = write_files(root, size)
        print(f"{size} rows: files ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for fmt in args.formats:
            size_mb = files[fmt].stat().st_size / 2**20
            for limit in args.max_prompt_length:
                cache = root / f"cache-{fmt}-{size}-{limit}"
                shutil.rmtree(cache, ignore_errors=True)
                for when in ("first", "cached"):
                    r = start(args, files[fmt], cache, limit)
                    entry_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
                    results.append(dict(size=size, fmt=fmt, limit=limit, when=when, file_mb=size_mb, **r))
                    results[-1]["cache_mb"] = entry_mb
                    print(r["report"], f"({when}, limit {limit or 'none'})", file=sys.stderr)
    print(
        table(
            [
                {
                    "rows": f"{r['size']:,}",
                    "format": f"{r['fmt']} ({r['file_mb']:.0f} MB)",
                    "max_prompt_length": r["limit"] or "none",
                    "start": r["when"],
                    "load s": f"{r['load_s']:.3f}",
                    f"first {args.batches}x{args.batch_size} s": f"{r['batches_s']:.3f}",
                    "RSS after load +MB": f"{r['loaded_mb']:.1f}",
                    "peak RSS +MB": f"{r['peak_mb']:.1f}",
                    "RSS after +MB": f"{r['held_mb']:.1f}",
                    "anon after +MB": f"{r['anon_mb']:.1f}",
                    "RSS before MB": f"{r['base_mb']:.0f}",
                    "cache MB": f"{r['cache_mb']:.0f}",
                }
                for r in results
            ],
            [
                "rows",
                "format",
                "max_prompt_length",
                "start",
                "load s",
                f"first {args.batches}x{args.batch_size} s",
                "RSS after load +MB",
                "peak RSS +MB",
                "RSS after +MB",
                "anon after +MB",
                "RSS before MB",
                "cache MB",
            ],
        )
    )
    if len(args.sizes) > 1:
        small, big = min(args.sizes), max(args.sizes)
        print(f"\n{big:,} / {small:,} rows ({big // small}x the rows):")
        by = {(r["size"], r["fmt"], r["limit"], r["when"]): r for r in results}
        for fmt in args.formats:
            for limit in args.max_prompt_length:
                for when in ("first", "cached"):
                    a, b = by[(small, fmt, limit, when)], by[(big, fmt, limit, when)]
                    print(
                        f"  {fmt:8} limit {str(limit or 'none'):5} {when:7} "
                        f"load {b['load_s'] / a['load_s']:7.1f}x   "
                        f"peak RSS {b['peak_mb'] / max(a['peak_mb'], 0.1):6.1f}x   "
                        f"RSS after {b['held_mb'] / max(a['held_mb'], 0.1):6.1f}x   "
                        f"anon after {b['anon_mb'] / max(a['anon_mb'], 0.1):6.1f}x"
                    )
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
