"""`collate` hands the engine's log-probs (pi_b of the off-policy corrections) to the learner:
flat fp32 in token order, only when every sample has one per response token."""

from __future__ import annotations

import torch

from rlpost.data.batch import Sample, collate


def samples() -> list[Sample]:
    return [
        Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], rollout_logp=[-0.5, -1.25, -2.0]),
        Sample(prompt_ids=[1], response_ids=[6], rollout_logp=[-0.1]),
    ]


def test_rollout_logp_is_flat_fp32_in_token_order():
    for packed in (False, True):
        got = collate(samples(), pad_id=0, packed=packed)["rollout_logp"]
        assert got.dtype == torch.float32
        assert got.tolist() == torch.tensor([-0.5, -1.25, -2.0, -0.1]).tolist()


def test_rollout_logp_is_left_out_unless_every_sample_has_one_per_token():
    short, missing = samples(), samples()
    short[0].rollout_logp = [-0.5, -1.25]
    missing[1].rollout_logp = []
    for batch in (short, missing):
        assert "rollout_logp" not in collate(batch, pad_id=0)
