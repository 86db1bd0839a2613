"""Sweep files: expansion into runs, conflicting keys, validation before anything runs,
and the runner's resume logic (with the trainer process stubbed; test_sweep_run.py
runs real ones)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml

from rlpost.cli import main
from rlpost.config.load import dump_config, parse_override
from rlpost.errors import ConfigError
from rlpost.jobs.preflight import load_config
from rlpost.sweeps import runner as sweep_runner
from rlpost.sweeps.manifest import DONE
from rlpost.sweeps.runner import Progress, format_seconds, run_sweep
from rlpost.sweeps.sweep import load_sweep, yaml_text
from tests.run_helpers import ROOT, TINY


def write_sweep(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("BASE", str(TINY)).replace("OUT", str(tmp_path / "out")))
    return path


GRID = """
name: grid-test
base: BASE
seeds: [0, 1]
overrides: {steps: 2}
grid:
  algorithm.loss_agg: [token-mean, balanced]
  learner.lr: [1.0e-4, 3.0e-4]
output_dir: OUT
"""


def test_grid_times_seeds_expands_seed_major_with_resolved_configs(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GRID))
    assert sweep.name == "grid-test" and sweep.directory == tmp_path / "out" / "grid-test"
    arms = [
        "loss_agg=token-mean,lr=0.0001",
        "loss_agg=token-mean,lr=0.0003",
        "loss_agg=balanced,lr=0.0001",
        "loss_agg=balanced,lr=0.0003",
    ]
    assert list(sweep.arms) == arms
    # every arm at seed 0 first: a sweep stopped half-way compares all arms
    assert [(r.arm, r.seed) for r in sweep.runs] == [(a, s) for s in (0, 1) for a in arms]
    assert sweep.runs[-1].id == "loss_agg=balanced,lr=0.0003-seed1"

    run = sweep.runs[5]  # token-mean, lr 3e-4, seed 1
    cfg = sweep.resolve(run)
    assert (cfg.seed, cfg.steps, cfg.learner.lr) == (1, 2, 3e-4)
    assert cfg.algorithm.params()["loss_agg"] == "token-mean"
    assert cfg.output_dir == str(sweep.directory / "runs" / run.id)
    assert cfg.tracking.group == "grid-test"
    assert cfg.tracking.run_name == "loss_agg=token-mean,lr=0.0003,seed=1"
    assert cfg.tracking.tags == [
        "algorithm.loss_agg=token-mean",
        "learner.lr=0.0003",
        "arm=loss_agg=token-mean,lr=0.0003",
        "seed=1",
    ]
    # everything else is the base config's
    base = load_config(TINY).model_dump()
    for key in ("model", "task", "warmup", "rollout"):
        assert cfg.model_dump()[key] == base[key]


def test_arms_as_labels_or_as_a_list(tmp_path):
    named = load_sweep(
        write_sweep(
            tmp_path,
            """
base: BASE
arms:
  small: {learner.lr: 1.0e-4}
  large: {learner.lr: 1.0e-3, learner.epochs: 1}
""",
        )
    )
    assert named.name == "sweep" and named.seeds == [3]  # the file's stem, the base's seed
    assert list(named.arms) == ["small", "large"]
    assert [r.id for r in named.runs] == ["small-seed3", "large-seed3"]
    assert named.resolve(named.runs[1]).learner.epochs == 1

    listed = load_sweep(
        write_sweep(
            tmp_path,
            """
base: BASE
arms:
  - {learner.lr: 1.0e-4}
  - {learner.lr: 1.0e-3, task.args: {digits: 2}}
""",
        )
    )
    assert list(listed.arms) == ["lr=0.0001", "lr=0.001,args={digits: 2}"]
    assert listed.resolve(listed.runs[1]).task.args == {"digits": 2}
    assert listed.runs[1].id == "lr=0.001,args=_digits__2_-seed3"


@pytest.mark.parametrize(
    "text, error",
    [
        (
            "base: BASE\ngrid:\n  learner.lr: [0.1]\n  learner.lr: [0.2]\n",
            "line 4: key 'learner.lr' is given twice",
        ),
        (
            "base: BASE\noverrides: {learner.lr: 0.1}\ngrid: {learner.lr: [0.2, 0.3]}\n",
            "key 'learner.lr' of arm 'lr=0.2' is also set for every run ('learner.lr' under 'overrides')",
        ),
        (
            "base: BASE\noverrides: {learner: {lr: 0.1}}\narms: {a: {learner.epochs: 2}}\n",
            "key 'learner.epochs' of arm 'a' is also set for every run ('learner' under 'overrides')",
        ),
        (
            "base: BASE\ngrid: {learner: [{lr: 0.1}], learner.lr: [0.2]}\n",
            "key 'grid': 'learner' and 'learner.lr' set the same key",
        ),
        (
            "base: BASE\ngrid: {seed: [1, 2]}\n",
            "key 'grid.seed': set by the sweep for every run (list seeds under 'seeds')",
        ),
        (
            "base: BASE\narms: {a: {tracking.group: g}}\n",
            "key 'arms.a.tracking.group': set by the sweep for every run",
        ),
        ("base: BASE\ngrid: {steps: [1]}\narms: {a: {}}\n", "give either 'grid' or 'arms', not both"),
        (
            "base: BASE\ngrdi: {steps: [1]}\n",
            "unknown key 'grdi'; a sweep file has name, base, seeds, overrides, grid, arms, "
            "baseline, output_dir",
        ),
        ("base: BASE\ngrid: {steps: 3}\n", "key 'grid.steps' must be a non-empty list of values"),
        ("base: BASE\nseeds: [1, 1]\n", "key 'seeds' lists a seed twice"),
        (
            "base: BASE\narms: {'a/b': {}, 'a_b': {}}\n",
            "two arms map to the same run directory "
            "'a_b-seed3'; give them labels that differ in letters or digits",
        ),
        ("grid: {steps: [1]}\n", "key 'base' (the base config file) is missing"),
    ],
)
def test_bad_sweep_files_are_one_clear_error(tmp_path, text, error):
    path = write_sweep(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert str(e.value) == f"{path}: {error}"


def test_every_run_is_validated_before_any_runs(tmp_path, capsys):
    # the second arm's value is wrong; the CLI stops with one line, exit 2, nothing written
    path = write_sweep(tmp_path, GRID.replace("[1.0e-4, 3.0e-4]", "[1.0e-4, -1]"))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rlpost: error: {path}: run loss_agg=token-mean,lr=-1-seed0: {TINY} (with "
        f"overrides): key 'learner.lr': Input should be greater than 0 (got -1)"
    )
    assert not (tmp_path / "out").exists()

    path = write_sweep(tmp_path, GRID.replace("learner.lr:", "learner.lrr:"))
    with pytest.raises(ConfigError, match=r"run .*-seed0: .* unknown key 'learner.lrr'$"):
        load_sweep(path)


def test_command_line_overrides_apply_to_every_run_but_not_to_varied_keys(tmp_path):
    path = write_sweep(tmp_path, GRID)
    sweep = load_sweep(path, ["steps=5", "learner.epochs=1"], name="short", output_dir=str(tmp_path))
    assert sweep.directory == tmp_path / "short"
    assert {(c.steps, c.learner.epochs) for c in map(sweep.resolve, sweep.runs)} == {(5, 1)}
    with pytest.raises(ConfigError, match="override 'learner.lr=0.1': .* varies 'learner.lr' per arm"):
        load_sweep(path, ["learner.lr=0.1"])
    with pytest.raises(ConfigError, match="'seed' is set by the sweep"):
        load_sweep(path, ["seed=4"])


def test_aggregation_sweep_reproduces_the_ablation_files():
    """configs/sweeps/aggregation.yaml runs exactly the configs of docs/ablations.md."""
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "aggregation.yaml")
    assert sweep.seeds == [0, 1, 2] and len(sweep.runs) == 9
    files = {
        "aggregation-token-mean": "aggregation_token_mean",
        "aggregation-seq-mean": "aggregation_seq_mean",
        "aggregation-balanced": "aggregation_balanced",
    }
    assert list(sweep.arms) == list(files)

    def comparable(cfg):
        tree = cfg.model_dump(mode="json")
        del tree["output_dir"], tree["tracking"]
        return tree

    for run in sweep.runs:
        ablation = load_config(
            ROOT / "configs" / "ablations" / f"{files[run.arm]}.yaml", [f"seed={run.seed}"]
        )
        assert comparable(sweep.resolve(run)) == comparable(ablation), run.id


@pytest.mark.parametrize(
    "value",
    [
        "balanced",
        "1e-4",
        "yes",
        "",
        "a: b",
        "x, y",
        1e-4,
        3,
        True,
        None,
        [1, "two"],
        {"digits": 3, "op": "+"},
    ],
)
def test_values_survive_the_trip_through_override_text(value):
    assert parse_override(f"k={yaml_text(value)}")[1] == value


# ------------------------------------------------------------ the runner, stubbed
class FakeTrainer:
    """Stands in for `python -m rlpost.cli train`: writes what a run leaves behind
    (config.yaml, metrics.jsonl) and prints progress lines."""

    def __init__(self, sweep, fail: set[str] = ()):
        self.sweep, self.fail, self.calls = sweep, set(fail), []

    def __call__(self, cmd, log_path, on_line):
        self.calls.append(cmd)
        run_id = log_path.parent.name
        run = next(r for r in self.sweep.runs if r.id == run_id)
        resume = [c.removeprefix("resume=") for c in cmd if c.startswith("resume=")]
        run_dir = Path(resume[0]) if resume else log_path.parent / "run-20261122-000000"
        run_dir.mkdir(exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(self.sweep.resolve(run)))
        rows = [
            {"step": 0, "eval/accuracy_greedy": 0.25},
            {"step": 1, "reward/mean": 0.5},
            {"step": 2, "reward/mean": 0.75, "eval/accuracy_greedy": 0.5},
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(log_path, "a") as log:
            for line in ("warm-up 4/4 | nll 1.0", "step 1/2 | reward 0.5", "step 2/2 | reward 0.75"):
                log.write(line + "\n")
                on_line(line)
        return 1 if run_id in self.fail else 0


def test_runner_skips_finished_runs_resumes_started_ones_and_stops_on_changed_configs(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, GRID.replace("seeds: [0, 1]", "seeds: [0]"))
    sweep = load_sweep(path)
    ids = [r.id for r in sweep.runs]
    fake = FakeTrainer(sweep, fail={ids[1]})
    monkeypatch.setattr(sweep_runner, "execute", fake)
    out = io.StringIO()
    assert run_sweep(sweep, out=out, report=False) == 1
    text = out.getvalue()
    assert f"[sweep 2/4] arm={sweep.runs[1].arm} seed=0 | FAILED (exit 1)" in text
    assert "    step 2/2 | reward 0.75" in text  # the end of the failed run's log
    assert "finished in 0s | greedy acc 0.250 -> 0.500" in text
    assert "3 of 4 runs finished; failed: " + ids[1] in text
    d = sweep.directory
    assert [(d / "runs" / i / DONE).is_file() for i in ids] == [True, False, True, True]
    done = json.loads((d / "runs" / ids[0] / DONE).read_text())
    assert done["run_dir"] == f"runs/{ids[0]}/run-20261122-000000"
    manifest = json.loads((d / "sweep.json").read_text())
    assert [r["id"] for r in manifest["runs"]] == ids and list(manifest["arms"]) == list(sweep.arms)
    first = fake.calls[0]
    assert first[1:5] == ["-m", "rlpost.cli", "train", str(TINY)]
    assert "steps=2" in first and "seed=0" in first and "tracking.group=grid-test" in first

    # again: the finished runs are skipped, the failed one resumes in its run directory
    fake.calls, fake.fail = [], set()
    out = io.StringIO()
    assert run_sweep(sweep, out=out, report=False) == 0
    assert len(fake.calls) == 1
    assert fake.calls[0][-1] == f"resume={d / 'runs' / ids[1] / 'run-20261122-000000'}"
    assert out.getvalue().count("finished before, skipped") == 3
    assert all((d / "runs" / i / DONE).is_file() for i in ids)

    # a sweep whose runs' configs changed stops before running anything
    changed = load_sweep(path, ["steps=3"])
    with pytest.raises(
        ConfigError,
        match=rf"run {ids[0]} started with a different config "
        r"\(steps changed\); remove .* or give the sweep",
    ):
        run_sweep(changed, out=io.StringIO(), report=False)


def test_progress_lines_and_time_left():
    now = [0.0]
    out = io.StringIO()
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "aggregation.yaml")
    progress = Progress(total=9, out=out, every=10, clock=lambda: now[0])
    run = sweep.runs[0]
    progress.begin(1, run, after=8)
    for t, line in [
        (5, "warm-up 250/2500 | nll 1.5"),
        (100, "step 0/80 | acc 0.4"),
        (101, "step 1/80 | reward 0.5"),
        (103, "step 2/80 | reward 0.5"),
        (105, "step 3/80 | reward 0.5"),
        (120, "step 10/80 | reward 0.6"),
    ]:
        now[0] = t
        progress.feed(line)
    lines = out.getvalue().splitlines()
    prefix = "[sweep 1/9] arm=aggregation-token-mean seed=0 | "
    # the first run has no estimate before its RL steps; printed at most every 10 s
    assert lines == [
        prefix + "warm-up 250/2500 | eta ?",
        prefix + "step 0/80 | eta ?",
        # 2 s per step since step 0: 70 steps left = 140 s; the run would take
        # 120 + 140 = 260 s, and 8 such runs come after it
        prefix + f"step 10/80 | eta {format_seconds(140 + 8 * 260)}",
    ]
    assert progress.end(300.0) == 8 * 300.0
    progress.begin(2, sweep.runs[1], after=7)
    now[0] += 100  # a finished run's duration is the estimate until RL steps start
    assert progress.eta() == pytest.approx(200 + 7 * 300)
    assert [format_seconds(s) for s in (None, 42, 250, 3725)] == ["?", "42s", "4m10s", "1h02m"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_files_in_configs_validate(path):
    assert load_sweep(path).runs


@pytest.mark.parametrize(
    "baseline, expected",
    [
        ("a", {"b": "a", "c": "a"}),
        ("c", {"a": "c", "b": "c"}),
    ],
)
def test_baseline_arm_by_label(tmp_path, baseline, expected):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"base: {TINY}\narms:\n  a: {{learner.lr: 1.0e-4}}\n  b: {{learner.lr: 2.0e-4}}\n"
        f"  c: {{learner.lr: 3.0e-4}}\nbaseline: {baseline}\n"
    )
    assert load_sweep(path).baselines == expected


def test_baseline_by_values_compares_within_each_row_of_a_grid(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"base: {TINY}\ngrid:\n  learner.lr: [1.0e-4, 2.0e-4]\n"
        "  algorithm.loss_agg: [token-mean, balanced]\n"
        "baseline: {algorithm.loss_agg: token-mean}\n"
    )
    assert load_sweep(path).baselines == {
        "lr=0.0001,loss_agg=balanced": "lr=0.0001,loss_agg=token-mean",
        "lr=0.0002,loss_agg=balanced": "lr=0.0002,loss_agg=token-mean",
    }


@pytest.mark.parametrize(
    "baseline, message",
    [
        ("z", "key 'baseline': no arm is labelled 'z'"),
        ("{learner.epochs: 2}", "key 'baseline.learner.epochs': arm 'a' does not vary it"),
        ("{learner.lr: 5.0e-4}", "key 'baseline': no arm has lr=0.0005, the baseline of arm 'a'"),
        ("[a]", "key 'baseline' must be an arm's label or a mapping"),
    ],
)
def test_bad_baselines_are_refused(tmp_path, baseline, message):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"base: {TINY}\narms:\n  a: {{learner.lr: 1.0e-4}}\n  b: {{learner.lr: 2.0e-4}}\n"
        f"baseline: {baseline}\n"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(path)


def test_a_key_rlpost_gained_since_a_run_started_is_no_change_at_its_default(tmp_path):
    from rlpost.sweeps.runner import config_changes

    cfg = load_config(TINY)
    written = yaml.safe_load(dump_config(cfg))
    del written["save_keep_last"], written["warmup"]["reuse"]  # an older rlpost's config.yaml
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    assert config_changes(tmp_path, cfg) == []
    # the same keys set to something else, or an old key changed, still are changes
    assert config_changes(tmp_path, load_config(TINY, ["warmup.reuse=true", "save_keep_last=2"])) == [
        "save_keep_last",
        "warmup.reuse",
    ]
    assert config_changes(tmp_path, load_config(TINY, ["steps=3"])) == ["steps"]
