"""launch/: the scripts parse, and a training job submitted through launch/submit.sh
runs on a real Ray cluster started by launch/ray_cluster.sh on 127.0.0.1 (and a Slurm
batch script run with stand-ins for srun and scontrol does the same).

The test clusters keep to themselves: their own temp dir (so no other `ray.init()`
on this machine finds them) and their own ports. They are stopped by ending their
own processes, never with `ray stop`, which ends every Ray process of the user on
the machine, other tests' clusters included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlpost.workers.group import free_port
from tests.run_helpers import ROOT, only_run_dir, read_metrics

SCRIPTS = ["launch/ray_cluster.sh", "launch/submit.sh", "launch/slurm_ray.sbatch", "launch/setup.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


@pytest.mark.parametrize(
    "script, args",
    [
        ("launch/submit.sh", ["train"]),
        ("launch/submit.sh", ["evaluate", "x.yaml"]),
        ("launch/ray_cluster.sh", ["restart"]),
    ],
)
def test_scripts_refuse_wrong_usage(script, args):
    proc = subprocess.run(
        ["bash", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:1"},
    )
    assert proc.returncode == 2 and proc.stderr.startswith("usage: ")


def auth_env() -> dict[str, str]:
    """Ray 2.60 turns token authentication on for a cluster whose head finds a token
    (~/.ray/auth_token, which a first local `ray.init()` writes); clients must send it."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return {"RAY_AUTH_MODE": "token"} if token.is_file() else {}


def end_processes(pgid: int, *markers: str) -> None:
    """End the cluster's processes: its process group, and any process whose command
    line names one of `markers` (its temp dir, the test's directory)."""
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and (
                os.getpgid(p.pid) == pgid or any(m in arg for arg in p.info["cmdline"] or [] for m in markers)
            ):
                mine.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    for p in mine:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def cluster_env(temp: Path) -> dict[str, str]:
    """ray start settings of a head of its own on 127.0.0.1."""
    return {
        "RAY_HEAD": "127.0.0.1",
        "RAY_HEAD_IP": "127.0.0.1",
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_HOST": "127.0.0.1",
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_NUM_CPUS": "2",
        "RAY_START_ARGS": f"--temp-dir={temp} --ray-client-server-port={free_port()} "
        f"--dashboard-agent-listen-port={free_port()}",
    }


@contextmanager
def private_temp_dir():
    # short: Ray's unix socket paths under it must stay below 108 characters
    temp = Path(tempfile.mkdtemp(prefix="rlray", dir="/tmp"))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def local_cluster(tmp_path: Path):
    """A Ray head started by launch/ray_cluster.sh; yields its job server address."""
    with private_temp_dir() as temp:
        env = {**os.environ, **cluster_env(temp)}
        with open(tmp_path / "ray_start.log", "w") as log:
            # its own session: the daemons `ray start` leaves behind share its process group
            start = subprocess.Popen(
                ["bash", "launch/ray_cluster.sh", "start"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            start.wait(timeout=120)
            assert start.returncode == 0, (tmp_path / "ray_start.log").read_text()[-3000:]
            yield f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
        finally:
            end_processes(start.pid, str(temp), str(tmp_path))


@pytest.mark.slow
def test_training_job_submitted_through_launch_runs_on_a_ray_cluster(tmp_path):
    job = f"rlpost-test-{os.getpid()}"
    with local_cluster(tmp_path) as address:
        env = {
            **os.environ,
            "RAY_ADDRESS": address,
            "RLPOST_OUTPUT_DIR": str(tmp_path / "runs"),
            "RLPOST_JOB_ID": job,
        }
        submit = subprocess.run(
            [
                "bash",
                "launch/submit.sh",
                "train",
                "tests/configs/tiny.yaml",
                "mode=ray",
                "steps=2",
                "warmup.steps=4",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        assert f"Job '{job}' succeeded" in output

        client = {**os.environ, **auth_env()}
        status = subprocess.run(
            [str(ROOT / ".venv/bin/ray"), "job", "status", job, "--address", address],
            env=client,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"Job '{job}' succeeded" in status.stdout + status.stderr
        # the run's workers were actors of this cluster
        actors = subprocess.run(
            [
                str(ROOT / ".venv/bin/ray"),
                "list",
                "actors",
                "--address",
                address,
                "--format",
                "json",
                "--limit",
                "100",
            ],
            env=client,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        classes = sorted(a["class_name"] for a in json.loads(actors.stdout))
        assert {"Learner", "RolloutWorker", "JobSupervisor"} <= set(classes), classes

    run = only_run_dir(tmp_path / "runs")
    assert sorted(read_metrics(run)) == [0, 1, 2]
    assert (run / "final_model" / "config.json").is_file()
    assert "address: auto" in (run / "config.yaml").read_text()


SHIMS = {
    # the allocation is this machine; srun runs its command here
    "scontrol": "#!/usr/bin/env bash\necho localhost\n",
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do\n'
    '  case "$1" in -w|--nodelist) shift 2;; *) shift;; esac\ndone\nexec "$@"\n',
}


@pytest.mark.slow
def test_slurm_script_runs_a_sweep_on_its_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    sweep = tmp_path / "one.yaml"
    sweep.write_text(
        f"base: {ROOT / 'tests/configs/tiny.yaml'}\noverrides: {{mode: ray, steps: 2, warmup.steps: 4}}\n"
    )
    with private_temp_dir() as temp:
        settings = cluster_env(temp)
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_CPUS_PER_TASK": "2",
            "RAY_PORT": settings["RAY_PORT"],
            "RAY_START_ARGS": settings["RAY_START_ARGS"] + " --include-dashboard=false",
        }
        with open(tmp_path / "slurm.log", "w") as log:
            job = subprocess.Popen(
                [
                    "bash",
                    "launch/slurm_ray.sbatch",
                    "sweep",
                    str(sweep),
                    "--output-dir",
                    str(tmp_path / "sweeps"),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            job.wait(timeout=300)
        finally:
            end_processes(job.pid, str(temp), str(tmp_path))
    log = (tmp_path / "slurm.log").read_text()
    assert job.returncode == 0, log[-4000:]
    assert "Ray cluster of 1 nodes at " in log and "sweep one: 1 of 1 runs finished" in log
    done = json.loads((tmp_path / "sweeps" / "one" / "runs" / "base-seed3" / "done.json").read_text())
    run = tmp_path / "sweeps" / "one" / done["run_dir"]
    assert sorted(read_metrics(run)) == [0, 1, 2]
    assert "address: auto" in (run / "config.yaml").read_text()
