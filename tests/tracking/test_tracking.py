import json
import struct
import time
import zlib
from pathlib import Path

import pytest

from rlpost.config.rl import TrainConfig
from rlpost.tracking.tracker import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_metrics(step: int) -> dict[str, float]:
    return {
        "reward/mean": step / 8,
        "loss": -0.125 * step,
        "entropy": 1.5 - step / 16,
        "clip_frac_low": 0.0,
        "clip_frac_high": 0.03125 * step,
        "response_length/mean": 4.0 + step,
        "time/step": 0.5,
        "tokens_per_sec": 1000.0 * step,
        "approx_kl": 1e-3,
    }


def test_jsonl_rows_and_console(tmp_path, capsys):
    cfg = TrainConfig(steps=5)
    cfg.tracking.log_every = 2
    before = time.time()
    tr = Tracker(tmp_path, cfg)
    logged = {}
    for step in range(1, 6):
        m = _train_metrics(step)
        if step == 3:
            m.update({"eval/accuracy_greedy": 0.375, "eval/accuracy_sampled": 0.25})
        logged[step] = m
        tr.log(m, step)
    # rows are flushed as they are logged, before close
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
    tr.close()
    after = time.time()

    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert before <= r["time"] <= after
        assert {k: v for k, v in r.items() if k not in ("step", "time")} == logged[r["step"]]
    assert rows[2]["eval/accuracy_greedy"] == 0.375
    assert rows[3]["loss"] == -0.5
    assert "eval/accuracy_greedy" not in rows[1]

    out = capsys.readouterr().out.splitlines()
    # every 2nd step, the eval step, and the final step; step 1 is skipped
    assert [line.split(" | ")[0] for line in out] == ["step 2/5", "step 3/5", "step 4/5", "step 5/5"]
    assert out[0] == (
        "step 2/5 | reward 0.250 | loss -0.2500 | entropy 1.375 | clip_lo 0.0000 | "
        "clip_hi 0.0625 | len 6.0 | time 0.50s | tok/s 2000"
    )
    assert "acc 0.375 | acc_sampled 0.250" in out[1]
    assert "acc" not in out[2]


def test_console_skips_missing_keys(tmp_path, capsys):
    tr = Tracker(tmp_path, TrainConfig(steps=50))
    tr.log({"reward/mean": 0.41, "something_else": 3.0}, step=12)
    tr.log({"eval/accuracy_greedy": 0.5}, step=0)
    tr.print_line("hello")
    tr.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 12/50 | reward 0.410",
        "step 0/50 | acc 0.500",
        "hello",
    ]


def test_nonfinite_values_are_strict_json(tmp_path):
    tr = Tracker(tmp_path, TrainConfig(steps=2))
    tr.log({"loss": float("nan"), "entropy": float("inf"), "reward/mean": 1}, step=1)
    tr.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)
    assert row["loss"] is None and row["entropy"] is None and row["reward/mean"] == 1


def test_plot_is_a_real_png(tmp_path):
    import matplotlib.image as mpimg

    cfg = TrainConfig(steps=5)
    tr = Tracker(tmp_path, cfg)
    assert tr.plot() is None  # nothing logged yet: no file, no error
    for step in range(1, 6):
        m = _train_metrics(step)
        if step in (1, 5):
            m["eval/accuracy_greedy"] = step / 10
        tr.log(m, step)
    path = tr.plot()
    assert path == tmp_path / "plots" / "metrics.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[:2] == (800, 1200)
    path.unlink()
    tr.close()  # close draws the final plot
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list((tmp_path / "plots").glob("*.tmp*"))


def test_plot_tolerates_sparse_and_odd_data(tmp_path):
    import matplotlib.image as mpimg

    tr = Tracker(tmp_path, TrainConfig(steps=3))
    tr.log({"eval/accuracy_sampled": 0.5}, step=0)  # only one eval point
    tr.log({"unrelated": 1.0, "loss": None}, step=1)  # nothing plottable
    tr.log({"reward/mean": "n/a"}, step=2)  # non-numeric
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a half-written line
        f.write('{"step": 3, "reward/me')
    path = tr.plot()
    assert path is not None and mpimg.imread(path).ndim == 3
    tr.close()


def test_resume_truncates_then_appends(tmp_path):
    cfg = TrainConfig(steps=5)
    tr = Tracker(tmp_path, cfg)
    for step in range(1, 6):
        tr.log({"reward/mean": float(step)}, step)
    tr.close()
    # a run killed mid-write leaves a broken last line
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')

    tr = Tracker(tmp_path, cfg, resume_step=3)
    rows = _rows(tmp_path)
    assert [(r["step"], r["reward/mean"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    tr.log({"reward/mean": 40.0}, 4)
    tr.log({"reward/mean": 50.0}, 5)
    tr.close()
    rows = _rows(tmp_path)
    assert [(r["step"], r["reward/mean"]) for r in rows] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]


def test_fresh_tracker_starts_a_new_file(tmp_path):
    tr = Tracker(tmp_path, TrainConfig(steps=2))
    tr.log({"reward/mean": 1.0}, 1)
    tr.close()
    tr = Tracker(tmp_path, TrainConfig(steps=2))
    tr.log({"reward/mean": 2.0}, 1)
    tr.close()
    assert [r["reward/mean"] for r in _rows(tmp_path)] == [2.0]


def test_disabled_wandb_leaves_no_trace(tmp_path):
    tr = Tracker(tmp_path, TrainConfig(steps=1))
    tr.log({"reward/mean": 1.0}, 1)
    tr.close()
    assert tr.wandb_run is None
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()


# --------------------------------------------------------------------- W&B
# wandb 0.31 writes no config.yaml / wandb-metadata.json for offline runs: the
# config, the run's name and group, and the history live only in the run's
# `run-<id>.wandb` transaction log (LevelDB log format: 7-byte ":W&B" header,
# 32 KiB blocks, records of crc32(type+data) u32, length u16, type u8).
def _read_wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _offline_run(run_dir: Path, run_id: str) -> dict:
    dirs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    runs = []
    for d in dirs:
        recs = _read_wandb_records(d / f"run-{run_id}.wandb")
        run = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        assert len(run) == 1
        config = {item.key: json.loads(item.value_json) for item in run[0].config.update}
        for r in recs:
            if r.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        history = []
        for rec in recs:
            if rec.WhichOneof("record_type") == "history":
                # wandb 0.31 fills `nested_key` (a path), not `key`, for history items
                items = {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item
                }
                history.append(
                    (rec.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")})
                )
        runs.append({"dir": d, "run": run[0], "config": config, "history": history})
    return runs


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B hermetic: offline, and its caches/config under tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg_cache"))
    return tmp_path / "run"


def test_wandb_offline_run_records_config_and_history(wandb_env):
    run_dir = wandb_env
    cfg = TrainConfig(steps=4, name="tracking-test")
    cfg.tracking.wandb = "offline"
    cfg.tracking.project = "rlpost-tests"
    cfg.tracking.group = "group-a"

    tr = Tracker(run_dir, cfg)
    assert tr.wandb_run is not None
    for step in (1, 2, 3):
        tr.log({"reward/mean": step / 4, "loss": -step / 8}, step)
    tr.close()

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id
    runs = _offline_run(run_dir, run_id)
    assert len(runs) == 1
    r = runs[0]
    assert (r["dir"] / "files").is_dir()
    assert r["run"].run_id == run_id
    assert r["run"].display_name == "tracking-test"
    assert r["run"].run_group == "group-a"
    assert r["run"].project == "rlpost-tests"
    expected = cfg.model_dump(mode="json")
    assert {k: v for k, v in r["config"].items() if k != "_wandb"} == expected
    assert r["config"]["tracking"]["group"] == "group-a"
    assert r["config"]["name"] == "tracking-test"
    assert r["history"] == [
        (1, {"reward/mean": 0.25, "loss": -0.125}),
        (2, {"reward/mean": 0.5, "loss": -0.25}),
        (3, {"reward/mean": 0.75, "loss": -0.375}),
    ]

    # Resume from the step-2 checkpoint: same W&B id, a second offline run dir;
    # step 3 was already sent to W&B by the killed run, so only step 4 goes there.
    tr = Tracker(run_dir, cfg, resume_step=2)
    tr.log({"reward/mean": 0.875, "loss": 0.5}, 3)
    tr.log({"reward/mean": 1.0, "loss": 0.0}, 4)
    tr.close()
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    runs = _offline_run(run_dir, run_id)
    assert len(runs) == 2
    resumed = [x for x in runs if x["dir"] != r["dir"]][0]
    assert resumed["run"].run_id == run_id and resumed["run"].display_name == "tracking-test"
    assert resumed["history"] == [(4, {"reward/mean": 1.0, "loss": 0.0})]
    assert [(x["step"], x["reward/mean"]) for x in _rows(run_dir)] == [
        (1, 0.25),
        (2, 0.5),
        (3, 0.875),
        (4, 1.0),
    ]
