"""cDPO's contrastive critical-token weights and SparsePO's masks (activation masks from the
reference model, learned mask networks) against hand computations."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlpost.algorithms.preference import chunked_critical_weights, critical_weights
from rlpost.algorithms.sparsepo import MaskNetwork, SparsePOMasks, activation_mask


def test_critical_weights_by_hand():
    pos = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, -1.0]])
    neg = torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    targets = torch.tensor([1, 0])
    for gamma in (1.0, 0.5):
        want = []
        for row in range(2):
            z = [(1 + gamma) * p - gamma * n for p, n in zip(pos[row].tolist(), neg[row].tolist())]
            s = math.exp(z[targets[row]]) / sum(math.exp(v) for v in z)
            want.append(1 - s)
        torch.testing.assert_close(critical_weights(pos, neg, targets, gamma), torch.tensor(want))
    # gamma 1, row 0: z = (2, 3, -1) -> w = 1 - e^3 / (e^2 + e^3 + e^-1)
    assert critical_weights(pos, neg, targets)[0].item() == pytest.approx(
        1 - math.exp(3) / (math.exp(2) + math.exp(3) + math.exp(-1)), rel=1e-6
    )


def test_critical_weight_is_small_where_both_models_agree_on_the_token():
    """Identical models: z = z_pos, so w = 1 - p_pos(y); a token the models find certain
    is not critical."""
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    w = critical_weights(logits, logits, torch.tensor([0]))
    assert 0 < w.item() < 1e-4


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_critical_weights_equal_full_logits(chunk):
    torch.manual_seed(0)
    pos_head, neg_head = torch.nn.Linear(8, 41), torch.nn.Linear(8, 41, bias=False)
    pos_h, neg_h = torch.randn(23, 8), torch.randn(23, 8)
    targets = torch.randint(0, 41, (23,))
    got = chunked_critical_weights(pos_h, pos_head, neg_h, neg_head, targets, 0.7, chunk)
    torch.testing.assert_close(got, critical_weights(pos_head(pos_h), neg_head(neg_h), targets, 0.7))
    assert not got.requires_grad


# ----- SparsePO activation masks --------------------------------------------------------


def rescale_by_hand(values: list[float]) -> list[float]:
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    z = [(v - mean) / std for v in values]
    lo, hi = min(z), max(z)
    return [(v - lo) / (hi - lo) for v in z]


def test_activation_mask_by_hand():
    valid = torch.tensor([True, True, True, True, False])
    # kind "mlp": two layers [T=5, D=2]; kind "resid": one layer [T, D=3]; the last token is padding
    mlp = [
        torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0], [4.0, 6.0], [9.0, 9.0]]),
        torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 5.0], [2.0, 2.0], [-7.0, 1.0]]),
    ]
    resid = [
        torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [float("nan")] * 3])
    ]
    got = activation_mask({"mlp": mlp, "resid": resid}, valid)

    def layer(x):  # mean over hidden, over the 4 valid tokens
        return rescale_by_hand([statistics.fmean(row) for row in x[:4].tolist()])

    m1, m2, r = layer(mlp[0]), layer(mlp[1]), layer(resid[0])
    # by eye: mlp[0] means (2, 2, 0, 5) -> (0.4, 0.4, 0, 1)
    assert m1 == pytest.approx([0.4, 0.4, 0.0, 1.0])
    want = [((a + b) / 2 + c) / 2 for a, b, c in zip(m1, m2, r)] + [0.0]
    torch.testing.assert_close(got, torch.tensor(want))


def test_activation_mask_batched_and_degenerate_sequences():
    """Leading batch dims: each sequence is normalised over its own valid tokens. A sequence
    whose values are all equal (or that has one valid token) gets 1 on its valid tokens."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4)
    x[1] = 2.0
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] + [False] * 5])
    got = activation_mask({"attn": [x]}, valid)
    torch.testing.assert_close(got[0], torch.tensor(rescale_by_hand(x[0].mean(-1).tolist())))
    torch.testing.assert_close(got[1], torch.tensor([1.0] * 4 + [0.0] * 2))
    torch.testing.assert_close(got[2], torch.tensor([1.0] + [0.0] * 5))
    assert got.min() >= 0 and got.max() <= 1


def test_activation_mask_of_logits_from_their_mean():
    """The logits kind from mean_v z_v = h . mean_v W_v + mean_v b_v equals the mask of the
    materialised logits (within fp32 rounding)."""
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 50)
    h = torch.randn(7, 8)
    valid = torch.ones(7, dtype=torch.bool)
    mean_logit = (h @ head.weight.mean(0) + head.bias.mean())[:, None]
    torch.testing.assert_close(
        activation_mask({"logits": [mean_logit]}, valid),
        activation_mask({"logits": [head(h).detach()]}, valid),
        rtol=1e-5,
        atol=1e-5,
    )


# ----- SparsePO learned masks -----------------------------------------------------------


def test_mask_network_by_hand():
    torch.manual_seed(2)
    net = MaskNetwork(num_layers=2, d_model=3)
    with torch.no_grad():
        for norm in net.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        net.mix.weight.copy_(torch.tensor([[0.7, -0.4]]))
    hidden = [torch.randn(5, 3), torch.randn(5, 3)]
    got = net(hidden)
    for t in range(5):
        per_layer = []
        for k in range(2):
            x = hidden[k][t].tolist()
            mean, var = statistics.fmean(x), statistics.pvariance(x)
            normed = [
                (v - mean) / math.sqrt(var + net.norms[k].eps) * g + b
                for v, g, b in zip(x, net.norms[k].weight.tolist(), net.norms[k].bias.tolist())
            ]
            lin = sum(w * v for w, v in zip(net.proj[k].weight[0].tolist(), normed)) + net.proj[k].bias.item()
            per_layer.append(max(lin, 0.0))
        want = max(0.7 * per_layer[0] - 0.4 * per_layer[1], 0.0)
        assert got[t].item() == pytest.approx(want, abs=1e-6)


def test_mask_network_starts_as_the_layer_average_and_takes_bf16_states():
    net = MaskNetwork(num_layers=4, d_model=8)
    torch.testing.assert_close(net.mix.weight, torch.full((1, 4), 0.25))
    out = net([torch.randn(2, 6, 8, dtype=torch.bfloat16) for _ in range(4)])
    assert out.shape == (2, 6) and out.dtype == torch.float32 and (out >= 0).all()
    with pytest.raises(ValueError, match="4 layers, got 3"):
        net([torch.randn(6, 8)] * 3)


def test_common_and_independent_masks():
    torch.manual_seed(3)
    hidden = [torch.randn(9, 4) for _ in range(2)]
    m_u, m_d = SparsePOMasks(2, 4, "common")(hidden)
    assert m_u is m_d
    masks = SparsePOMasks(2, 4, "independent")
    m_u, m_d = masks(hidden)
    assert not torch.equal(m_u, m_d)
    m_d.sum().backward()  # m^d trains only the divergence network
    assert all(p.grad is None for p in masks.reward.parameters())
    assert any(p.grad is not None and p.grad.any() for p in masks.divergence.parameters())


def test_mask_dropout_only_in_training():
    torch.manual_seed(4)
    net = MaskNetwork(1, 16, dropout=0.5)
    hidden = [torch.randn(200, 16)]
    net.eval()
    clean = net(hidden)
    net.train()
    noisy = net(hidden)
    assert torch.equal(net.eval()(hidden), clean)
    assert not torch.equal(noisy, clean)
