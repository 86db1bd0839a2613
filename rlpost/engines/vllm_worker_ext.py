"""Worker-side half of the vLLM weight push.

vLLM mixes this class into its worker (``LLM(worker_extension_cls=
"rlpost.engines.vllm_worker_ext.WeightSyncExtension")``), so it must be
importable by dotted path inside vLLM's worker processes and must not import
anything heavy at module level.  Methods are called from the driver with
``llm.collective_rpc("rlpost_load_weights", args=(payload,))``.
"""

from __future__ import annotations

import io
import logging

import torch

# vLLM warns "RotaryEmbedding: Failed to load weights" on every push: its cos/sin
# cache is a buffer that no checkpoint holds, and vLLM puts its own values back.
# Only that logger is raised to ERROR; the logprob-gap metric checks each push.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)


class WeightSyncExtension:
    def rlpost_load_weights(self, payload: bytes | str) -> int:
        """Load a state dict (HF parameter names) into the running model.

        payload: the bytes of ``torch.save(state_dict)``, or the path of a file
        written with ``torch.save`` (used for large models, so the tensors do
        not have to travel through vLLM's RPC message queue).  Returns the
        number of tensors loaded.
        """
        if isinstance(payload, (bytes, bytearray, memoryview)):
            state_dict = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        else:
            state_dict = torch.load(payload, map_location="cpu", weights_only=True, mmap=True)
        # `reload_weights` goes through the model's own `load_weights` (which
        # fuses q/k/v and gate/up from HF names) with vLLM's loading context
        # set up; calling `model.load_weights` directly after start-up fails
        # ("'Parameter' object has no attribute 'weight_loader'").
        self.reload_weights(weights_iterator=iter(state_dict.items()))
        return len(state_dict)
