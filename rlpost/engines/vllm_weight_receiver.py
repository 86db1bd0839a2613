"""rlpost's backend in vLLM's weight-transfer subsystem (`vllm/distributed/weight_transfer/`).

vLLM's worker builds the backend named by `LLM(weight_transfer_config={"backend":
"rlpost"})` when it loads the model and drives its phases from RPCs:
`init_weight_transfer_engine` (join the transfer group), `start_weight_update` (begin
vLLM's layerwise reload, which takes checkpoint-format weights and re-runs each layer's
post-load processing, e.g. the CPU build's repacking, once its tensors are all in),
`update_weights` (receive every bucket, or load one handed over in an RPC) and
`finish_weight_update` (end the reload). vLLM's own nccl backend broadcasts with its
PyNccl communicator from a vLLM-side trainer engine; this one receives rlpost's buckets
(`weight_sync.Receiver`) over a torch process group, so the learners need no vLLM and the
same path runs over gloo on CPUs. Each tensor-parallel worker is a rank of the group of
its own and receives every tensor; vLLM's `load_weights` keeps its shard.

Registered from `vllm_worker_ext`, which vLLM imports in each worker process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rlpost.engines.weight_sync import Receiver, SyncPlan, bucket_from_list, unpack

BACKEND = "rlpost"


@dataclass
class InitInfo(WeightTransferInitInfo):
    plan: list  # SyncPlan.to_list()
    address: str
    port: int
    rank_offset: int  # this engine's first rank in the group
    world_size: int
    timeout_s: float
    ipc: bool = False  # handles to the sender's memory (TransferGroup)


@dataclass
class UpdateInfo(WeightTransferUpdateInfo):
    """Empty: receive a sync from the group. With `data`: one packed bucket handed over
    in the RPC (`specs` as SyncPlan.to_list() gives a bucket), loaded as `version`."""

    specs: list | None = None
    data: bytes | None = None
    version: int | None = None


class RlpostWeightTransferEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
    init_info_cls = InitInfo
    update_info_cls = UpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.receiver = Receiver(SyncPlan(()), device, self._load, "vllm engine", load_keeps=True)

    def init_transfer_engine(self, init_info: InitInfo) -> None:
        self.receiver.close()
        self.receiver.plan = SyncPlan.from_list(init_info.plan)
        rank = init_info.rank_offset + self.parallel_config.rank
        self.receiver.who = f"vllm engine (transfer rank {rank})"
        self.receiver.connect(
            init_info.address, init_info.port, rank, init_info.world_size, init_info.timeout_s, init_info.ipc
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(), which fails on the
        # CPU build; the group's broadcasts have completed (wait()) when receive returns
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: UpdateInfo) -> None:
        if update_info.data is None:
            self.receiver.receive()
            return
        bucket = bucket_from_list(update_info.specs)
        buf = torch.frombuffer(bytearray(update_info.data), dtype=torch.uint8).to(self.device)
        self._load(unpack(bucket, buf))
        self.receiver.version = update_info.version

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def _load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.model.load_weights(tensors)

    def shutdown(self) -> None:
        self.receiver.close()


def register() -> None:
    """Add the backend to vLLM's registry (once per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, RlpostWeightTransferEngine)
    except ValueError:  # registered already (the in-process engine imports this twice)
        pass
