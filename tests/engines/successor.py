"""A tiny Llama whose next token is set by the current token alone, so that stop tests
know which ids an engine generates.

Attention and MLP outputs are zeroed, so the final hidden state at a position is the
normed one-hot embedding of its token (sqrt(hidden) in that token's dimension) and the
output head maps it to a logit of ~56 for the token's successor(s) and 0 for every other
token: sampling at T=1 draws the successor (a tie between two successors is a coin toss).

Characters: 0 -> 1 -> 2 -> (3 or +) and 3 -> 4 -> ... -> 9 -> + -> = -> EOS
(`cycle=True`: = -> 0 instead, and 2 -> 3 only, so a response never ends by itself).
"""

from __future__ import annotations

from pathlib import Path

import torch

ALPHABET = "0123456789+="
EOS = 2
SCALE = 5.0  # x sqrt(128) ~ 56: the successor's log-prob is 0 to float precision


def tok(ch: str) -> int:
    return 3 + ALPHABET.index(ch)  # char_tokenizer: <pad> <s> </s>, then the alphabet


def ids(text: str) -> list[int]:
    return [tok(ch) for ch in text]


def successors(cycle: bool) -> dict[int, list[int]]:
    nxt = {tok(a): [tok(b)] for a, b in zip("0123456789+", "123456789+=")}
    nxt[tok("=")] = [tok("0")] if cycle else [EOS]
    if not cycle:
        nxt[tok("2")] = [tok("3"), tok("+")]
    for special in (0, 1, EOS):
        nxt[special] = [tok("0")]
    return nxt


def successor_model_dir(out: Path, cycle: bool = False, extra_chars: str = "") -> Path:
    """`extra_chars`: more tokens in the vocabulary (never generated)."""
    from rlpost.config.sections import ModelConfig
    from rlpost.model.load import load_model, materialise_initial_model

    out = materialise_initial_model(
        ModelConfig(), alphabet=ALPHABET + extra_chars, seed=0, out_dir=out, max_len=4096
    )
    model = load_model(out)
    model.load_state_dict(successor_state_dict(model.state_dict(), cycle))
    model.save_pretrained(out)
    return out


def successor_state_dict(state: dict[str, torch.Tensor], cycle: bool = False) -> dict[str, torch.Tensor]:
    """`state` (a tiny Llama's) made into the successor model."""
    out = {k: v.clone() for k, v in state.items()}
    embed, head = out["model.embed_tokens.weight"], out["lm_head.weight"]
    vocab, hidden = embed.shape
    assert vocab <= hidden
    embed.zero_()
    embed[:, :vocab] = torch.eye(vocab)
    head.zero_()
    for cur, nxt in successors(cycle).items():
        head[nxt, cur] = SCALE
    for name, value in out.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            value.zero_()
        elif name.endswith("norm.weight"):
            value.fill_(1.0)
    return out


def chain(last: str, steps: int, branch: str = "3") -> list[int]:
    """The `steps` tokens after a prompt ending in `last` (non-cycle model), taking
    `branch` after 2; EOS ends it."""
    nxt = successors(False)
    out, cur = [], tok(last)
    while len(out) < steps and cur != EOS:
        options = nxt[cur]
        cur = tok(branch) if len(options) > 1 else options[0]
        out.append(cur)
    return out
