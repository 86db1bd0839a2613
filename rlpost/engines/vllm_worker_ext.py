"""Worker-side additions to vLLM: rlpost's weight-transfer backend and its version.

vLLM mixes `WeightSyncExtension` into its worker (``LLM(worker_extension_cls=
"rlpost.engines.vllm_worker_ext.WeightSyncExtension")``) and imports this module in each
worker process before the model loads, which is when the worker builds the backend of
`weight_transfer_config`: importing registers rlpost's (vllm_weight_receiver.py). Methods
are called from the driver with ``llm.collective_rpc(name)``.
"""

from __future__ import annotations

import logging

from rlpost.engines.vllm_weight_receiver import register

# vLLM warns "RotaryEmbedding: Failed to load weights" on every sync: its cos/sin cache is
# a buffer that no checkpoint holds, and vLLM puts its own values back. Only that logger
# is raised to ERROR; the version check and the log-prob gap check each sync.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

register()


class WeightSyncExtension:
    def rlpost_weight_version(self) -> int:
        """The version of the weights this worker loaded last (0: the model it started with)."""
        return self.weight_transfer_engine.receiver.version
