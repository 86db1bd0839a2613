"""Weights from the learners to the rollout engines, in buckets, over a process group.

Rank 0 of a transfer group is the learners' rank 0; the other ranks are the engines'
receiving processes (a transformers engine's rollout worker; each tensor-parallel worker of
a vLLM engine). When the group opens, every receiver gets the `SyncPlan`: the tensors under
the engine's names, in the order they travel, cut into buckets of at most `bucket_bytes`.
A sync broadcasts a header (the weight version and the plan's digest), then every bucket as
one flat byte tensor; a receiver loads views of a bucket before the next one arrives, so no
process holds more than a bucket beyond its model, and no host ever holds a state dict.

The group is torch.distributed's own: NCCL between GPUs, gloo between CPU processes (the
same code, so CI runs the path clusters run). It is made from a TCPStore at the sender's
address and never joins the default group, which the learners' DeepSpeed owns.

The version is the learners' optimizer step count: it travels in the header, each receiver
keeps the one it loaded, and every completion an engine returns carries it back, so a
controller can tell a rollout made with stale weights from a current one.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # registers tensor reductions (IPC handles) with ForkingPickler

ALIGN = 16  # bytes: every tensor starts at a multiple, so a byte slice views as any dtype
Loader = Callable[[list[tuple[str, torch.Tensor]]], None]


class WeightSyncError(RuntimeError):
    """Engines and learners disagree on the weights: a version or plan mismatch."""


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the engine's (HF) parameter name
    shape: tuple[int, ...]
    dtype: str  # torch dtype name on the wire (the engine's dtype), e.g. "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.torch_dtype).element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class SyncPlan:
    buckets: tuple[tuple[TensorSpec, ...], ...]

    @classmethod
    def cut(cls, specs: Iterable[TensorSpec], bucket_bytes: int) -> SyncPlan:
        """`specs` in order, a new bucket whenever the next tensor would overflow this one;
        a tensor larger than `bucket_bytes` travels in a bucket of its own."""
        buckets: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            n = _aligned(spec.nbytes)
            if buckets[-1] and size + n > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(spec)
            size += n
        return cls(tuple(tuple(b) for b in buckets if b))

    @staticmethod
    def bucket_bytes(bucket: Sequence[TensorSpec]) -> int:
        return sum(_aligned(s.nbytes) for s in bucket)

    @property
    def max_bucket_bytes(self) -> int:
        return max((self.bucket_bytes(b) for b in self.buckets), default=0)

    @property
    def nbytes(self) -> int:
        return sum(self.bucket_bytes(b) for b in self.buckets)

    def to_list(self) -> list:
        """A plain-data form for an RPC (`from_list` reads it back)."""
        return [bucket_to_list(b) for b in self.buckets]

    @classmethod
    def from_list(cls, data: list) -> SyncPlan:
        return cls(tuple(bucket_from_list(b) for b in data))

    def digest(self) -> int:
        """A 62-bit fingerprint: sender and receiver check they cut the stream alike."""
        raw = hashlib.sha256(json.dumps(self.to_list()).encode()).digest()
        return int.from_bytes(raw[:8], "little") >> 2


def bucket_to_list(bucket: Sequence[TensorSpec]) -> list:
    """One bucket's specs as plain data (a bucket handed over in an RPC carries them)."""
    return [[s.name, list(s.shape), s.dtype] for s in bucket]


def bucket_from_list(data: list) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, tuple(shape), dtype) for name, shape, dtype in data)


def dtype_name(dtype: torch.dtype) -> str:
    """A TensorSpec's dtype: "float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


def pack(bucket: Sequence[TensorSpec], tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """`tensors` copied into the byte tensor `out` at the bucket's offsets, each cast to its
    spec's dtype by the copy itself (no temporary in between)."""
    for view, tensor in zip(_views(bucket, out), tensors):
        view.copy_(tensor.reshape(view.shape))
    return out


def unpack(bucket: Sequence[TensorSpec], buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of a received bucket (valid while `buf` is)."""
    return [(s.name, v) for s, v in zip(bucket, _views(bucket, buf))]


def _views(bucket: Sequence[TensorSpec], buf: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in bucket:
        out.append(buf[offset : offset + s.nbytes].view(s.torch_dtype).view(s.shape))
        offset += _aligned(s.nbytes)
    return out


def local_buckets(
    state_dict: dict[str, torch.Tensor], wire_dtype: str, bucket_bytes: int = 256 * 2**20
) -> Iterator[tuple[tuple[TensorSpec, ...], torch.Tensor]]:
    """A whole state dict as packed buckets, each with its specs (an engine's
    `update_weights`, for tests and benchmarks)."""
    specs = (TensorSpec(k, tuple(v.shape), wire_dtype) for k, v in state_dict.items())
    plan = SyncPlan.cut(specs, bucket_bytes)
    tensors = iter(state_dict.values())
    for bucket in plan.buckets:
        buf = torch.empty(plan.bucket_bytes(bucket), dtype=torch.uint8)
        yield bucket, pack(bucket, [next(tensors) for _ in bucket], buf)


class TransferGroup:
    """A process group of its own: rank 0 sends, the others receive.

    `ipc`: the ranks share a device (colocated engines and learners; NCCL refuses two ranks
    on one GPU): a bucket travels as a handle to the sender's memory (CUDA IPC on a GPU,
    shared memory on a CPU), pickled by torch.multiprocessing's reductions and broadcast
    over gloo; each receiver copies the bucket out, and the sender reuses its buffer only
    once every receiver has (a barrier). Otherwise the bytes themselves are broadcast
    (NCCL on GPUs, gloo on CPUs)."""

    def __init__(
        self,
        address: str,
        port: int,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float,
        ipc: bool = False,
    ):
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        # the sender hosts the store; receivers connect to its address (any node)
        self.store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        self.ipc = ipc
        self.wire = torch.device("cpu") if ipc else device  # where the group's collectives run
        if self.wire.type == "cuda":
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size)
        else:
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        if ipc and device.type == "cpu":
            # the default (file descriptors passed over a socket) works only between a
            # process and its children; named shared memory works between any two
            torch.multiprocessing.set_sharing_strategy("file_system")
        self.rank, self.world_size, self.device = rank, world_size, device

    def broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()

    def buffer(self, nbytes: int) -> torch.Tensor:
        """The sender's bucket buffer (in shared memory for a CPU `ipc` group)."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf.share_memory_() if self.ipc and self.device.type == "cpu" else buf

    def send(self, buf: torch.Tensor) -> None:
        if not self.ipc:
            self.broadcast(buf)
            return
        self._broadcast_bytes(bytes(ForkingPickler.dumps(buf)))
        self._barrier()

    def receive(self, buf: torch.Tensor) -> torch.Tensor:
        """A bucket, into `buf` (bytes on this rank's device, of the bucket's size)."""
        if not self.ipc:
            self.broadcast(buf)
            return buf
        shared = pickle.loads(self._broadcast_bytes(None))
        buf.copy_(shared)
        del shared  # before the barrier: the sender may then overwrite it
        self._barrier()
        return buf

    def _broadcast_bytes(self, data: bytes | None) -> bytes:
        """`data` from rank 0 (None on the others) to every rank: its size, then it."""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        self.broadcast(size)
        if data is not None:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            raw = torch.empty(int(size), dtype=torch.uint8)
        self.broadcast(raw)
        return raw.numpy().tobytes()

    def _barrier(self) -> None:
        self.pg.allreduce([torch.zeros(1)]).wait()

    def close(self) -> None:
        self.pg = self.store = None


def header(version: int, plan: SyncPlan, device: torch.device) -> torch.Tensor:
    """What a sync broadcasts first: its version and the digest of the plan that cut it."""
    return torch.tensor([version, plan.digest()], dtype=torch.int64, device=device)


def check_header(values: list[int], plan: SyncPlan, who: str) -> int:
    """The version a header announces, after checking it was cut by `plan`."""
    version, digest = values
    if digest != plan.digest():
        raise WeightSyncError(
            f"{who}: the learner's weight plan (digest {digest}) is not the one this engine "
            f"was given (digest {plan.digest()}); the parameters or their dtypes changed"
        )
    return version


class Receiver:
    """The engine side of a sync: `load` takes each bucket's (name, tensor) views (`who`
    names the engine in errors). `load_keeps` says whether `load` holds on to them after it
    returns: vLLM's layerwise reload keeps them until their layer is complete, which may be
    a bucket later, so each bucket then arrives in a buffer of its own; otherwise one buffer
    serves every bucket of every sync (fresh pages cost more than the copy: 0.5 s of a
    0.5B model's sync on the 2-core CPU, bench/weight_sync.py)."""

    def __init__(self, plan: SyncPlan, device: torch.device, load: Loader, who: str, load_keeps: bool):
        self.plan, self.device, self.load, self.who = plan, device, load, who
        self.load_keeps = load_keeps
        self.group: TransferGroup | None = None
        self.version = 0  # engines start from the learners' initial weights
        self._buf: torch.Tensor | None = None

    def connect(
        self, address: str, port: int, rank: int, world_size: int, timeout_s: float, ipc: bool = False
    ) -> None:
        self.group = TransferGroup(address, port, rank, world_size, self.device, timeout_s, ipc)

    def receive(self) -> int:
        """One sync from the group: the header, then every bucket. Returns the version."""
        head = torch.empty(2, dtype=torch.int64, device=self.group.wire)
        self.group.broadcast(head)
        version = check_header(head.tolist(), self.plan, self.who)
        for bucket in self.plan.buckets:
            self.load(unpack(bucket, self.group.receive(self._buffer(SyncPlan.bucket_bytes(bucket)))))
        self.version = version
        return version

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self.load_keeps:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self._buf is None:
            self._buf = torch.empty(self.plan.max_bucket_bytes, dtype=torch.uint8, device=self.device)
        return self._buf[:nbytes]

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
