"""Checkpoints that do not fill the disk or lose the last good state (issue 22):
save_keep_last / save_keep_best retention, deletion only after the new checkpoint is
complete and on disk (fsync), and a write that fails for lack of space."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from rlpost.jobs import run_dir as rd
from rlpost.jobs.preflight import load_config
from rlpost.jobs.run_dir import (
    STATE_FILE,
    CheckpointError,
    Retention,
    latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from tests.run_helpers import TINY


class FakeLearners:
    """Writes a learner's checkpoint files as DeepSpeed does (ckpt_dir/tag/...); `fail_at`:
    the step whose write runs out of space after its first file."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def call(self, method: str, ckpt_dir: str, tag: str) -> None:
        assert method == "save_checkpoint"
        out = Path(ckpt_dir) / tag / "global_step1"
        out.mkdir(parents=True, exist_ok=True)
        (out / "mp_rank_00_model_states.pt").write_bytes(b"m" * 1000)
        if self.fail_at is not None and tag == f"step_{self.fail_at}":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        (out / "optim_states.pt").write_bytes(b"o" * 1000)


def save(run: Path, steps, retention=None, learners=None, metrics: dict[int, float] | None = None):
    learners = learners or FakeLearners()
    for step in steps:
        if metrics and step in metrics:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "eval/accuracy_greedy": metrics[step]}) + "\n")
        save_checkpoint(run, learners, step, {"data_position": step}, retention=retention)


def tags(run: Path) -> list[str]:
    return sorted((p.name for p in (run / "checkpoints").glob("step_*")), key=lambda t: int(t[5:]))


def test_default_keeps_every_checkpoint(tmp_path):
    save(tmp_path, range(1, 6), Retention())
    assert tags(tmp_path) == [f"step_{i}" for i in range(1, 6)]


def test_keep_last(tmp_path):
    save(tmp_path, range(1, 6), Retention(last=2))
    assert tags(tmp_path) == ["step_4", "step_5"]
    assert latest_checkpoint(tmp_path)[0] == "step_5"


def test_keep_best_by_an_eval_metric(tmp_path):
    """The best of the checkpoints saved at eval steps stays besides the last N; on a tie the
    later one; a step without the metric is no candidate."""
    values = {2: 0.5, 4: 0.75, 6: 0.25, 8: 0.75, 10: 0.125}
    save(tmp_path, range(1, 11), Retention(last=1, best="eval/accuracy_greedy"), metrics=values)
    assert tags(tmp_path) == ["step_8", "step_10"]
    lowest = tmp_path / "min"
    lowest.mkdir()
    save(lowest, range(1, 11), Retention(last=2, best="eval/accuracy_greedy", mode="min"), metrics=values)
    assert tags(lowest) == ["step_9", "step_10"]  # step 10 is the min itself
    save(lowest, [11], Retention(last=1, best="eval/accuracy_greedy", mode="min"))
    assert tags(lowest) == ["step_10", "step_11"]


def test_incomplete_leftovers_are_pruned_and_never_counted(tmp_path):
    save(tmp_path, [1, 2], Retention(last=1))
    (tmp_path / "checkpoints" / "step_3" / "global_step1").mkdir(parents=True)  # a killed write
    save(tmp_path, [4], Retention(last=2))
    assert tags(tmp_path) == ["step_2", "step_4"]


def test_out_of_space_keeps_the_previous_checkpoint(tmp_path):
    """A write that runs out of space midway is an error naming the checkpoint and the one
    kept; its half-written directory is removed; nothing older is deleted."""
    save(tmp_path, [1, 2], Retention(last=1))
    before = {
        p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()
    }
    with pytest.raises(CheckpointError) as err:
        save(tmp_path, [3], Retention(last=1), learners=FakeLearners(fail_at=3))
    assert str(err.value) == (
        "checkpoint step_3 could not be written (OSError: [Errno 28] No space left on device); "
        "it was removed and the last complete one, step_2, is intact"
    )
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    after = {
        p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()
    }
    assert after == before and tags(tmp_path) == ["step_2"]
    assert latest_checkpoint(tmp_path)[1]["data_position"] == 2


def test_state_written_when_the_rest_is_on_disk_and_old_ones_deleted_after(tmp_path, monkeypatch):
    """Every file of the new checkpoint is fsynced before trainer_state.json (which makes it
    complete) is written; that file and its directory are fsynced; only then is the old one
    deleted."""
    save(tmp_path, [1], Retention(last=1))
    events = []
    real_fsync, real_write_json, real_prune = os.fsync, rd.write_json, rd.prune_checkpoints

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def write_json(path, value, **kw):
        events.append(("write", str(path)))
        real_write_json(path, value, **kw)

    def prune(run, retention):
        events.append(("prune", tags(run)))
        return real_prune(run, retention)

    monkeypatch.setattr(rd.os, "fsync", fsync)
    monkeypatch.setattr(rd, "write_json", write_json)
    monkeypatch.setattr(rd, "prune_checkpoints", prune)
    save(tmp_path, [2], Retention(last=1))
    new = tmp_path / "checkpoints" / "step_2"
    state = str(new / STATE_FILE)
    written = events.index(("write", state))
    synced_before = {path for kind, path in events[:written] if kind == "fsync"}
    files = {str(p) for p in new.rglob("*") if p.name != STATE_FILE}
    assert files <= synced_before and str(new) in synced_before
    assert ("fsync", state) in events[written:] and ("fsync", str(new)) in events[written:]
    assert events[-1] == ("prune", ["step_1", "step_2"])
    assert tags(tmp_path) == ["step_2"]


def test_prune_without_retention_deletes_nothing(tmp_path):
    save(tmp_path, [1, 2, 3])
    assert prune_checkpoints(tmp_path, Retention()) == [] and len(tags(tmp_path)) == 3


def test_config_keys():
    cfg = load_config(TINY, ["save_keep_last=2", "save_keep_best=eval/accuracy_greedy"])
    assert Retention.of(cfg) == Retention(2, "eval/accuracy_greedy", "max")
    # every default is null, so a config.yaml written before the keys existed is unchanged
    # for `rlpost sweep`'s check of a run it resumes (rlpost/sweeps/runner.py config_changes)
    dumped = load_config(TINY).model_dump()
    assert [dumped[k] for k in ("save_keep_last", "save_keep_best", "save_keep_best_mode")] == [None] * 3
    with pytest.raises(ValueError, match="save_keep_best keeps the best checkpoint .* set save_keep_last"):
        load_config(TINY, ["save_keep_best=eval/accuracy_greedy"])
    with pytest.raises(ValueError, match="save_keep_last"):
        load_config(TINY, ["save_keep_last=0"])


def test_a_refusal_after_start_up_marks_the_run_failed_and_keeps_it(tmp_path):
    from rlpost.errors import ConfigError

    kept, removed = tmp_path / "kept", tmp_path / "removed"
    for d in (kept, removed):
        d.mkdir()
        (d / "config.yaml").write_text("x: 1\n")
    # started (a warm-up may already lie in it): FAILED, never removed
    with pytest.raises(ConfigError), rd.failure_marked(kept, new=True, started=lambda: True):
        raise ConfigError("key 'rollout.max_new_tokens': too long for the model")
    assert (
        kept / "FAILED"
    ).read_text() == "ConfigError: key 'rollout.max_new_tokens': too long for the model\n"
    # refused before anything started: the new directory goes
    with pytest.raises(ConfigError), rd.failure_marked(removed, new=True, started=lambda: False):
        raise ConfigError("key 'x': bad")
    assert not removed.exists()


def test_marking_a_failure_on_a_full_disk_lets_the_error_through(tmp_path, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", no_space)
    with (
        pytest.raises(RuntimeError, match="the real reason"),
        rd.failure_marked(tmp_path, new=False, started=lambda: True),
    ):
        raise RuntimeError("the real reason")
    assert not (tmp_path / "FAILED").exists() and not (tmp_path / "FAILED.tmp").exists()


def test_a_checkpoint_whose_state_file_is_cut_short_is_not_the_latest(tmp_path):
    for step, text in ((1, json.dumps({"step": 1})), (2, "")):  # step 2: emptied by a crash
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step}" / STATE_FILE).write_text(text)
    assert latest_checkpoint(tmp_path) == ("step_1", {"step": 1})
