"""One weight sync, learners' rank 0 -> rollout engines: the object-store path issue 17
replaced vs the bucketed broadcast over a transfer group, time and the sender's host memory.

    python bench/weight_sync.py                          # tiny, 135M, 0.5B, 1.5B; 1 and 2 engines
    python bench/weight_sync.py --quick                  # tiny and 135M, 1 repeat (a smoke run)
    python bench/weight_sync.py --sizes qwen2.5-0.5b --engines 2 --bucket-mb 64 256

Models have random weights in published shapes, written once with save_pretrained (under
--dir, kept; else a temporary dir); a configuration whose estimated host memory exceeds what
is available is skipped. In a local Ray, a sender actor holds the model (plain
transformers, no DeepSpeed) and 1 or 2 engine actors each hold an `HFEngine` of the saved dir.

- old: what a run did before: the sender's `export_state_dict` put in the object store
  (`ray.put`), the reference to every engine, which gets the whole dict and
  `model.load_state_dict`s it. (The old export also copied a tied embedding a second time,
  under lm_head.weight; here it travels once, as today's `export_state_dict` has it, so the
  baseline is if anything faster than the old path was.)
- new: the product's `WeightSender.send` on a `TransferGroup` rank 0 (gloo on CPU), each
  engine's `HFEngine.receive_weights`, submitted together and gathered, as
  rlpost/jobs/weights.py runs a sync.

A sync is timed wall-clock from the driver, after one untimed sync per path that also checks
the engines' weights equal the sender's byte for byte (the sender negates its weights first,
so a sync that moved nothing fails). Paths and bucket sizes alternate within each repeat.
Memory: in the sender (and each engine), VmHWM reset through /proc/self/clear_refs just before
the sync, minus VmRSS then, and in brackets how much of it is shared memory newly mapped in
(the object store's pages count in a process's RSS once it touches them). The object store
holds the put object besides (`store MiB`): shared memory, host memory all the same.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

MiB = 2**20
# name: (config class, hidden, intermediate, layers, heads, kv heads, vocab, dtype); all
# tie their embeddings but "tiny", rlpost's own tiny Llama (model.kind tiny's defaults)
SIZES = {
    "tiny": ("tiny", 128, 256, 2, 2, 2, 16, "float32"),
    "smollm2-135m": ("LlamaConfig", 576, 1536, 30, 9, 3, 49152, "float32"),
    "qwen2.5-0.5b": ("Qwen2Config", 896, 4864, 24, 14, 2, 151936, "bfloat16"),
    "qwen2.5-1.5b": ("Qwen2Config", 1536, 8960, 28, 12, 2, 151936, "bfloat16"),
}
PROCESS_GIB = 0.7  # a Ray worker with torch and transformers imported, before any model


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measured(fn):
    """`fn()` and the process's peak RSS above its RSS just before, and the growth of its
    shared-memory pages (the object store's, mapped in) over the call, in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the baseline is honest
    base, shm = _status("VmRSS"), _status("RssShmem")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    out = fn()
    return out, {"peak": (_status("VmHWM") - base) / MiB, "shm": (_status("RssShmem") - shm) / MiB}


def digest(named: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Sender:
    """The learners' rank 0: the LM, an object-store export (old) or a WeightSender (new)."""

    def __init__(self, model_dir: str, dtype: str, threads: int):
        torch.set_num_threads(threads)
        from rlpost.model.export import export_entries
        from rlpost.model.load import load_model

        self.lm, self.dtype = load_model(model_dir, dtype), dtype
        self.names = [e.name for e in export_entries(self.lm, False)]
        self.senders, self.groups = {}, {}

    def rss_mib(self) -> float:
        return _status("VmRSS") / MiB

    def pid(self) -> int:
        return os.getpid()

    def plan(self, bucket_bytes: int) -> tuple[list, float]:
        """The plan (plain data), its largest bucket and all its bytes in MiB."""
        from rlpost.workers.weight_sender import WeightSender

        sender = self.senders[bucket_bytes] = WeightSender(self.lm, False, False, self.dtype, bucket_bytes)
        return sender.plan.to_list(), sender.plan.max_bucket_bytes / MiB, sender.plan.nbytes / MiB

    def rendezvous(self) -> tuple[str, int]:
        from rlpost.workers.group import free_port

        return "127.0.0.1", free_port()

    def connect(self, bucket_bytes: int, address: str, port: int, world: int) -> None:
        from rlpost.engines.weight_sync import TransferGroup

        self.groups[bucket_bytes] = TransferGroup(address, port, 0, world, torch.device("cpu"), 300.0)

    def send_new(self, bucket_bytes: int, version: int) -> dict:
        sender, group = self.senders[bucket_bytes], self.groups[bucket_bytes]
        return measured(lambda: sender.send(version, group, torch.device("cpu")))[1]

    def put_old(self):
        import ray

        from rlpost.model.export import export_state_dict

        ref, mem = measured(lambda: ray.put(export_state_dict(self.lm, False)))
        return [ref], mem  # in a list: the driver gets the reference, not the dict

    @torch.no_grad()
    def perturb(self) -> None:
        for p in self.lm.parameters():
            p.neg_()

    def digest(self) -> str:
        sd = self.lm.state_dict()
        return digest([(n, sd[n]) for n in self.names])


class Engine:
    """A rollout worker's engine: an HFEngine of the saved model."""

    def __init__(self, model_dir: str, dtype: str, threads: int):
        torch.set_num_threads(threads)
        from rlpost.engines.hf_engine import HFEngine

        self.engine = HFEngine(model_dir, None, dtype)
        self.receivers = {}

    def open(self, bucket_bytes: int, plan: list, address: str, port: int, rank: int, world: int) -> None:
        self.engine.open_weights(plan, address, port, rank, world, 300.0, ipc=False)
        self.receivers[bucket_bytes] = self.engine.receiver

    def receive_new(self, bucket_bytes: int) -> tuple[int, dict]:
        self.engine.receiver = self.receivers[bucket_bytes]
        return measured(self.engine.receive_weights)

    def load_old(self, boxed: list) -> tuple[list[str], dict]:
        import ray

        def load():  # the reference was passed boxed so that getting it counts here
            result = self.engine.model.load_state_dict(ray.get(boxed[0]), strict=False)
            return list(result.missing_keys) + list(result.unexpected_keys)

        return measured(load)

    def digest(self, names: list[str]) -> str:
        return digest([(n, self.engine._params[n]) for n in names])

    def pid(self) -> int:
        return os.getpid()


def build(size: str, out: Path) -> Path:
    """The model of `size` with random weights, saved once under `out`."""
    path = out / size
    if (path / "config.json").exists():
        return path
    cls_name, hidden, inter, layers, heads, kv, vocab, dtype = SIZES[size]
    if cls_name == "tiny":
        from rlpost.config.sections import ModelConfig
        from rlpost.model.load import build_tiny_model

        model = build_tiny_model(ModelConfig(), vocab_size=16, seed=0)
    else:
        import transformers

        config = getattr(transformers, cls_name)(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=vocab,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        )
        auto = transformers.AutoModelForCausalLM
        torch.manual_seed(0)
        torch.set_default_dtype(getattr(torch, dtype))  # no fp32 copy of the model first
        try:
            model = auto.from_config(config)
        finally:
            torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    return path


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def estimate_gib(model: int, engines: int) -> float:
    """Host memory of one configuration at its old path's peaks (in models): the sender's
    model and 3 more during its put (the export and two serialised copies, measured), the
    object store's copy and each engine's model; later each engine's model and the dict it
    gets. Plus every process's own."""
    return max(5 + engines, 2 + 2 * engines) * model / 2**30 + PROCESS_GIB * (engines + 2)


def available_gib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) / 2**20


def run_config(ray, model_dir: Path, size: str, engines: int, args) -> list[dict]:
    """Every repeat of both paths for one model and engine count; one row per bucket size."""
    from rlpost.workers.group import gather

    dtype, threads = args.dtype or SIZES[size][-1], args.threads
    sender = ray.remote(num_cpus=1)(Sender).remote(str(model_dir), dtype, threads)
    workers = [ray.remote(num_cpus=1)(Engine).remote(str(model_dir), dtype, threads) for _ in range(engines)]
    buckets = [int(mb * MiB) for mb in args.bucket_mb]
    max_bucket = {}
    for b in buckets:  # one transfer group per bucket size, all open at once
        plan, max_bucket[b], model_mib = ray.get(sender.plan.remote(b))
        address, port = ray.get(sender.rendezvous.remote())
        world = engines + 1
        gather(
            [sender.connect.remote(b, address, port, world)]
            + [w.open.remote(b, plan, address, port, r + 1, world) for r, w in enumerate(workers)]
        )
        names = [s[0] for bk in plan for s in bk]
    version = 0

    def new(b: int) -> tuple[float, dict, list[dict]]:
        nonlocal version
        version += 1
        t = time.perf_counter()
        out = gather([sender.send_new.remote(b, version)] + [w.receive_new.remote(b) for w in workers])
        elapsed = time.perf_counter() - t
        assert all(v == version for v, _ in out[1:]), "an engine loaded another version"
        return elapsed, out[0], [m for _, m in out[1:]]

    def old() -> tuple[float, dict, list[dict], float]:
        t = time.perf_counter()
        boxed, mem = ray.get(sender.put_old.remote())
        out = gather([w.load_old.remote(boxed) for w in workers])
        elapsed = time.perf_counter() - t
        store = ray.experimental.get_object_locations(boxed)[boxed[0]]["object_size"] / MiB
        del boxed  # the object store frees its copy
        left = {k for keys, _ in out for k in keys}
        assert left <= {"lm_head.weight"}, f"load_state_dict left out {sorted(left)}"
        return elapsed, mem, [m for _, m in out], store

    def checked(sync, label: str):
        """A warm-up sync of newly negated weights: the engines must then hold the sender's."""
        ray.get(sender.perturb.remote())
        want = ray.get(sender.digest.remote())
        assert want not in ray.get([w.digest.remote(names) for w in workers]), "nothing to sync"
        result = sync()
        got = ray.get([w.digest.remote(names) for w in workers])
        assert all(g == want for g in got), f"{label}: an engine's weights differ from the sender's"
        print(f"  {size}, {engines} engine(s), {label}: engines match the sender", file=sys.stderr)
        return result

    results = {"old": [checked(old, "old")]}
    for b in buckets:
        results[b] = [checked(lambda b=b: new(b), f"new, {b // MiB} MiB buckets")]
    times = {k: [] for k in results}
    for _ in range(args.repeats):
        for key in results:
            r = old() if key == "old" else new(key)
            times[key].append(r[0])
            results[key].append(r)
    rss = ray.get(sender.rss_mib.remote())  # after the warm-ups wrote every page
    pids = ray.get([a.pid.remote() for a in [sender, *workers]])
    for actor in [sender, *workers]:
        ray.kill(actor)
    while any(Path(f"/proc/{pid}").exists() for pid in pids):  # their memory back before the next
        time.sleep(0.2)
    o, old_s = results["old"][1:], statistics.median(times["old"])
    rows = []
    for b in buckets:
        n, new_s = results[b][1:], statistics.median(times[b])
        rows.append(
            {
                "model": f"{size} ({dtype}, {model_mib:.0f} MiB)",
                "engines": engines,
                "bucket MiB": f"{b / MiB:.0f} (max {max_bucket[b]:.0f})",
                "old s (median / min)": f"{old_s:.3f} / {min(times['old']):.3f}",
                "new s (median / min)": f"{new_s:.3f} / {min(times[b]):.3f}",
                "speed-up old/new": f"{old_s / new_s:.2f}x",
                "sender +peak MiB old (shm)": _mem(r[1] for r in o),
                "sender +peak MiB new (shm)": _mem(r[1] for r in n),
                "store MiB old": f"{max(r[3] for r in o):.0f}",
                "engine +peak MiB old (shm)": _mem(m for r in o for m in r[2]),
                "engine +peak MiB new (shm)": _mem(m for r in n for m in r[2]),
                "sender RSS MiB": f"{rss:.0f}",
                # for the targets
                "_key": (size, engines),
                "_speedup": old_s / new_s,
                "_sender_new": max(r[1]["peak"] for r in n),
                "_two_buckets": 2 * max(b / MiB, max_bucket[b]),
                "_bucket": b / MiB,
            }
        )
    return rows


def _mem(ms) -> str:
    """The largest peak of a column's measurements, with the shared-memory growth in it."""
    ms = list(ms)
    return f"{max(m['peak'] for m in ms):.0f} ({max(m['shm'] for m in ms):.0f})"


def report(rows: list[dict]) -> None:
    print(table(rows, [c for c in rows[0] if not c.startswith("_")]) if rows else "no configuration ran")
    print(
        "\nbucket MiB: the configured size (max: the plan's largest bucket; a tensor over the size "
        "travels alone).\n+peak: VmHWM during the sync minus VmRSS just before, the largest over "
        "the repeats (and engines); (shm): the growth of its shared-memory pages (the object "
        "store's, mapped in) in it.\nstore MiB: the object put in Ray's object store (shared "
        "memory; counted in a process's RSS only the first time the process touches its pages).\n"
        "sender RSS: the sender process with its model, after the syncs."
    )
    for r in rows:
        if r["_key"] == ("qwen2.5-0.5b", 2):
            fast, small = r["_speedup"] >= 3, r["_sender_new"] <= r["_two_buckets"]
            print(
                f"\ntarget, qwen2.5-0.5b, 2 engines, {r['_bucket']:.0f} MiB buckets: "
                f"{r['_speedup']:.2f}x faster than the object store (target 3x): "
                f"{'met' if fast else 'NOT met'}; sender +peak {r['_sender_new']:.0f} MiB (target "
                f"at most two buckets, {r['_two_buckets']:.0f} MiB): {'met' if small else 'NOT met'}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[256.0, 64.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="every size's dtype (default: per size)")
    ap.add_argument("--quick", action="store_true", help="tiny and 135M, 1 repeat")
    ap.add_argument("--dir", type=Path, help="where the models go (kept); default: a temporary dir")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeats = [s for s in args.sizes if s in ("tiny", "smollm2-135m")], 1
    args.threads = int(os.environ.get("RLPOST_THREADS", os.cpu_count() or 1))
    import ray

    print(
        f"machine: {os.cpu_count()} CPUs, {available_gib():.1f} GiB available, torch {torch.__version__}, "
        f"ray {ray.__version__}, {args.threads} torch thread(s) per actor; median of {args.repeats}"
    )
    if torch.cuda.is_available():
        print(
            "CUDA device present: this script measures the CPU path (gloo) only; the CUDA IPC "
            "path for the 1.5B shape is not implemented here yet"
        )
    root = args.dir or Path(tempfile.mkdtemp(prefix="rlpost-sync-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=max(args.engines) + 1, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for size in args.sizes:
            t = time.perf_counter()
            path = build(size, root)
            print(f"{size}: model ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            for engines in args.engines:
                dtype = getattr(torch, args.dtype or SIZES[size][-1])
                nbytes = model_bytes(path) * dtype.itemsize // getattr(torch, SIZES[size][-1]).itemsize
                need, have = estimate_gib(nbytes, engines), available_gib()
                if need > have:
                    print(
                        f"{size}, {engines} engine(s): skipped, needs ~{need:.1f} GiB, {have:.1f} available"
                    )
                    continue
                rows += run_config(ray, path, size, engines, args)
    finally:
        ray.shutdown()
        if args.dir is None:
            shutil.rmtree(root)
    report(rows)


if __name__ == "__main__":
    main()
