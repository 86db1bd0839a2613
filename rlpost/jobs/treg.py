"""T-REG's token rewards (docs/algorithms.md section 8), computed once before `rlpost dpo` trains.

    r_t = sigmoid(log pi_ref(y_t | x_better, y_<t) - log pi_ref(y_t | x_worse, y_<t)) - 0.5

r_t comes from the frozen reference, so it is a constant of the data, computed once as cDPO's
critical weights are. The loader tokenizes each pair's prompt under the two revision
templates too (`load_preference_pairs(revisions=...)`, the chat template applied as to the
original); with the learners up, before the first step and the step-0 evaluation, the
learners' reference scores both responses of every training and held-out pair after each
revised prompt (four sequences a pair, cut under the learners' micro-batch budgets), and the
algorithm's `token_reward` turns the two log-probs of each token into r_t. The pairs keep
them (`PreferencePair.token_rewards`), their samples carry them (`TOKEN_REWARD`). A resumed
run computes them again: the same reference gives the same values.
"""

from __future__ import annotations

import time

from rlpost.data.batch import Sample
from rlpost.errors import ConfigError
from rlpost.jobs.update import learner_split
from rlpost.tracking.token_view import WeightedTokens, write_token_view

PAIRS_PER_CALL = 256  # pairs scored per learner call: bounds what crosses to the learners at once
KEYS = ("treg_better_prompt", "treg_worse_prompt")
VIEW_PAIRS = 6  # pairs drawn into token_rewards.html / .png


def _uses_token_rewards(algorithm) -> bool:
    return getattr(algorithm, "token_rewards", False)  # a pair loss's flag; SFT has none


def revision_templates(trainer, alphabet: str) -> tuple[str, ...]:
    """The (x_better, x_worse) templates the loader tokenizes; () without T-REG. The tiny
    model's character tokenizer (`alphabet`, printable ASCII) turns any other character into
    padding, so a template with one is refused with the key's name."""
    if not _uses_token_rewards(trainer.algorithm):
        return ()
    templates = tuple(trainer.algorithm.revision_prompts())
    if trainer.cfg.model.kind == "tiny":
        for key, text in zip(KEYS, templates):
            if unknown := sorted(set(text) - set(alphabet)):
                raise ConfigError(
                    f"key 'algorithm.{key}': {''.join(unknown)!r} is not printable ASCII, all the "
                    f"tiny model's character tokenizer knows"
                )
    return templates


def attach_token_rewards(trainer) -> None:
    """r_t of both responses of every training and held-out pair, into the pairs; the first
    pairs' drawn into the run directory. Nothing without T-REG."""
    if not _uses_token_rewards(trainer.algorithm):
        return
    t0 = time.perf_counter()
    pairs = trainer.train_rows + trainer.eval_rows
    for first in range(0, len(pairs), PAIRS_PER_CALL):
        _score(trainer, pairs[first : first + PAIRS_PER_CALL])
    tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    trainer.tracker.print_line(
        f"treg: token rewards of {len(pairs)} pairs ({tokens} tokens) in {time.perf_counter() - t0:.1f}s"
    )
    _view(trainer)


def _score(trainer, pairs: list) -> None:
    # per pair: chosen after x_better, chosen after x_worse, rejected after each
    samples = [
        Sample(prompt_ids=revised, response_ids=ids)
        for p in pairs
        for ids in (p.chosen_ids, p.rejected_ids)
        for revised in p.revised_prompt_ids
    ]
    parts = learner_split(trainer.cfg.learner, trainer.packed)(samples)
    logp = {}  # `shard` reorders the samples: by identity
    for part, flat in zip(parts, trainer.learners.call("reference_logprobs", per_rank=[(p,) for p in parts])):
        seqs = [s for micro in part for s in micro]
        if seqs:
            logp.update((id(s), v) for s, v in zip(seqs, flat.split([s.num_tokens for s in seqs])))
    reward = trainer.algorithm.token_reward
    for i, p in enumerate(pairs):
        better_w, worse_w, better_l, worse_l = (logp[id(s)] for s in samples[4 * i : 4 * i + 4])
        p.token_rewards = (reward(better_w, worse_w).tolist(), reward(better_l, worse_l).tolist())


def _view(trainer) -> None:
    """Both responses of the first held-out pairs (training pairs when none are held out),
    each token shaded by its r_t on a signed scale, with the original prompt."""
    decode = trainer.tokenizer.decode
    where = "held out" if trainer.eval_rows else "training"
    rows = [
        WeightedTokens(
            label=f"pair {p.row} ({where}), {side}",
            prompt=decode(p.prompt_ids) if side == "chosen" else None,
            tokens=[decode([t]) for t in ids],
            weights=r,
        )
        for p in (trainer.eval_rows or trainer.train_rows)[:VIEW_PAIRS]
        for side, ids, r in (
            ("chosen", p.chosen_ids, p.token_rewards[0]),
            ("rejected", p.rejected_ids, p.token_rewards[1]),
        )
    ]
    page, image = write_token_view(
        trainer.run_dir,
        rows,
        f"{trainer.run_dir.name}: T-REG token rewards r_t (from the reference, before training)",
        "token reward r_t",
        stem="token_rewards",
        signed=True,
        tokens_name="response",
    )
    trainer.tracker.print_line(f"token rewards: {page} ({image.name})")
