"""cDPO's contrastive estimation of critical tokens, as a worker.

docs/algorithms.md section 2, cDPO step 3: the positive and the negative model side by
side, scoring the tokens of incorrect trajectories.

    w_t = 1 - softmax((1 + gamma) z^pos_t - gamma z^neg_t)[y_t]

A Ray actor on a learner's slot (it needs a learner's device) or a plain object in the
in-process mode; `rlpost cdpo` shards the trajectories over as many as there are learner
ranks. Nothing here trains: the weights are constants of the later DPO loss.
"""

from __future__ import annotations

import torch

from rlpost.algorithms import chunked_critical_weights
from rlpost.data.batch import Sample, collate, shard
from rlpost.model.load import load_model
from rlpost.model.policy import PolicyModel
from rlpost.workers.threads import set_threads


class ContrastScorer:
    def __init__(
        self,
        positive: str,
        negative: str,
        dtype: str,
        gamma: float,
        pad_id: int,
        chunk_size: int,
        micro_batch_tokens: int | None,
        micro_batch_size: int | None,
    ):
        set_threads()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = [
            PolicyModel(load_model(path, dtype), chunk_size).to(self.device).eval()
            for path in (positive, negative)
        ]
        self.gamma, self.pad_id, self.chunk_size = gamma, pad_id, chunk_size
        self.budget = (micro_batch_tokens, micro_batch_size)

    @torch.no_grad()
    def weights(self, trajectories: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """The critical weight of every response token of each (prompt ids, response ids),
        in order. Padded micro-batches under the learner's budgets: the scorer has no
        varlen attention patched in, and padding changes no real token's logits."""
        samples = [Sample(prompt_ids=p, response_ids=r) for p, r in trajectories]
        place = {id(s): i for i, s in enumerate(samples)}  # `shard` reorders them
        out: list[list[float]] = [[] for _ in samples]
        for micro in shard(samples, 1, *self.budget, packed=False)[0]:
            batch = collate(micro, self.pad_id, packed=False)
            inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "pred_pos")}
            (pos_h, pos_head), (neg_h, neg_head) = [
                (m.hidden_states(**inputs), m.lm.get_output_embeddings()) for m in self.models
            ]
            w = chunked_critical_weights(
                pos_h,
                pos_head,
                neg_h,
                neg_head,
                batch["targets"].to(self.device),
                self.gamma,
                self.chunk_size,
            )
            for s, values in zip(micro, w.cpu().split([s.num_tokens for s in micro])):
                out[place[id(s)]] = values.tolist()
        return out

    def ping(self) -> int:
        return 0

    def shutdown(self) -> None:
        self.models = []
