"""The learner side of a weight sync: the LM's weights as the engines name them, a bucket at a time.

`WeightSender` reads the LM's parameters in state-dict order under the names a plain model
of the architecture has (with LoRA: peft's `.base_layer.` dropped and the adapter's own
tensors left out), each tensor once (tied embeddings travel once; the engines tie them
too), and cuts them into the buckets of a `SyncPlan`. `buckets()` yields each bucket's
tensors whole: under ZeRO-3 it gathers just that bucket's partitions (a collective, so
every rank iterates), under LoRA it merges just that bucket's layers, W + (alpha / r) B A
(peft's `get_delta_weight`). So a sync never holds more than a bucket of gathered or merged
weights besides the packed bucket itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import nn

from rlpost.engines.weight_sync import SyncPlan, TensorSpec, TransferGroup, header, pack
from rlpost.model.export import Entry, export_entries, full_shape, merged


class WeightSender:
    """`wire_dtype`: the engines' dtype (a torch dtype name), which the packing casts to."""

    def __init__(self, lm: nn.Module, lora: bool, zero3: bool, wire_dtype: str, bucket_bytes: int):
        self.entries = export_entries(lm, lora)
        self.zero3 = zero3
        self._buf: torch.Tensor | None = None  # the packing buffer, made by the first sync
        self.plan = SyncPlan.cut(
            (TensorSpec(e.name, full_shape(e.tensor), wire_dtype) for e in self.entries), bucket_bytes
        )

    def buckets(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(bucket index, its tensors whole), in plan order. The tensors are valid until the
        next bucket is asked for; every rank must iterate to the end under ZeRO-3."""
        start = 0
        for index, bucket in enumerate(self.plan.buckets):
            entries = self.entries[start : start + len(bucket)]
            start += len(bucket)
            with self._gathered(entries), torch.no_grad():
                yield index, [merged(e) for e in entries]

    def packed(
        self, device: torch.device, packs: bool, group: TransferGroup | None = None
    ) -> Iterator[tuple[int, torch.Tensor | None]]:
        """(bucket index, its packed bytes) in plan order, valid until the next. Only the
        rank that `packs` packs (the others yield None: they iterate for the gathers); with
        a `group`, each bucket is also broadcast from it."""
        buf = None
        if packs:
            # kept from sync to sync: fresh pages cost more than the packing copy
            # (bench/weight_sync.py); one bucket held between syncs
            if self._buf is None:
                size = self.plan.max_bucket_bytes
                self._buf = (
                    group.buffer(size) if group else torch.empty(size, dtype=torch.uint8, device=device)
                )
            buf = self._buf
        for index, tensors in self.buckets():
            if buf is None:
                yield index, None
                continue
            bucket = self.plan.buckets[index]
            part = pack(bucket, tensors, buf[: self.plan.bucket_bytes(bucket)])
            if group is not None:
                group.send(part)
            yield index, part

    def send(self, version: int, group: TransferGroup | None, device: torch.device) -> None:
        """One sync: the header, then every bucket, broadcast from the rank that holds
        `group` (the learners' rank 0); every other rank passes None and only iterates."""
        if group is not None:
            group.broadcast(header(version, self.plan, group.wire))
        for _ in self.packed(device, group is not None, group):
            pass

    def _gathered(self, entries: list[Entry]):
        if not self.zero3:
            return nullcontext()
        import deepspeed

        params = [e.tensor for e in entries]
        for e in entries:
            if e.lora is not None:
                params += [p for n, p in e.lora.named_parameters() if "lora_" in n]
        return deepspeed.zero.GatheredParameters(params)
