"""Which response tokens ssToken selects on the arithmetic task, and the check that `rlpost sft`
trains on the very prompt ids `rlpost eval` generates from (docs/seed_methods.md, "ssToken
against plain SFT").

    python docs/seed_methods/sstoken_selection.py --run SSTOKEN_RUN_DIR --data FILE [--rows N]

1. Token ids. The SFT job's loader (rlpost/data/datasets.py, with the job's tokenizer) and
   `rlpost eval`'s prompt encoding (rlpost/data/prompts.py, with the tokenizer `rlpost eval`
   loads from the run's final_model) must give the same prompt ids (BOS + the text, no chat
   template) for every eval problem and for the first N training rows; the loader's response
   ids must be the warm-up's (the text's ids + EOS). Any difference stops the script.
2. The signals, recomputed here with Hugging Face's eager attention (independently of the
   learner's hook), on the first N rows of FILE: log-probs under the policy and under the
   history model (the run's start model, `history_model: reference`), the last layer's
   head-averaged attention of each response token's own position on the prompt; then the
   selection of algorithms/sstoken.py (REL', score, top ceil(rho |y|)). Policies: the start
   model (the first step: REL = 0, attention alone), every checkpoint of the run and its
   final model. As a check of the recomputation, the attention mean on the run's first
   mini-batch (the rows `EpochStream` gave step 1) under the start model is printed next to
   the `sstoken/attn_mean` the run logged at step 1.
3. Per policy, the fraction of tokens selected by response length and position, and a few
   rows with the selected tokens in brackets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, LlamaForCausalLM

from rlpost.algorithms.sstoken import (
    SSTokenConfig,
    normalised_rel,
    selected_counts,
    top_per_sequence,
)
from rlpost.data.datasets import load_sft_examples
from rlpost.data.prompts import encode_prompt
from rlpost.data.stream import EpochStream
from rlpost.jobs.offline import TINY_ALPHABET
from rlpost.jobs.preflight import load_config
from rlpost.jobs.session import Session
from rlpost.model.load import char_tokenizer, load_tokenizer
from rlpost.rewards.tasks.arithmetic import add_without_carry

BATCH = 512


def check_token_ids(run: Path, rows: list[dict], seed: int, config: str) -> str:
    """Compares the SFT loader's ids with `rlpost eval`'s; raises SystemExit on a mismatch."""
    cfg = load_config(config, [f"seed={seed}", f"model.path={run / 'final_model'}"])
    with tempfile.TemporaryDirectory() as scratch:
        session = Session(cfg, Path(scratch))
        eval_problems = [p for s in session.eval_sets for p in s.problems]
        probe = [{"prompt": p.prompt, "completion": p.answer} for p in eval_problems] + rows
        path = Path(scratch) / "probe.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in probe))
        sft_tok = char_tokenizer(TINY_ALPHABET)  # what OfflineTrainer tokenizes with
        examples, report = load_sft_examples(path, sft_tok)
    if len(examples) != len(probe):
        raise SystemExit(f"token ids: the loader skipped rows: {report.summary()}")
    eval_tok = load_tokenizer(run / "final_model")  # what `rlpost eval` loads
    if eval_tok.get_vocab() != sft_tok.get_vocab():
        raise SystemExit("token ids: final_model's tokenizer is not the SFT job's")
    for row, ex in zip(probe, examples):
        want = encode_prompt(eval_tok, row["prompt"], cfg.task)
        response = eval_tok.encode(row["completion"], add_special_tokens=False) + [eval_tok.eos_token_id]
        if ex.prompt_ids != want or ex.completion_ids != response:
            raise SystemExit(f"token ids differ for {row}: {ex.prompt_ids} {ex.completion_ids} vs {want}")
    first = examples[0]
    return (
        f"token ids: equal for the {len(eval_problems)} eval prompts and {len(rows)} training rows "
        f"(SFT loader vs rlpost eval's encode_prompt; chat template: "
        f"{eval_tok.chat_template is not None}); e.g. {probe[0]['prompt']!r} -> "
        f"{first.prompt_ids} (BOS {eval_tok.bos_token_id}), response {first.completion_ids} "
        f"(EOS {eval_tok.eos_token_id})"
    )


def load_policy(run: Path, source: str) -> LlamaForCausalLM:
    """The start model, a checkpoint (`checkpoints/step_N`: the fp32 module of ZeRO 0-2) or
    the final model, with eager attention (it returns the probabilities)."""
    if source in ("initial", "final"):
        folder = run / "models" / "initial" if source == "initial" else run / "final_model"
        return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = LlamaForCausalLM(
        AutoConfig.from_pretrained(run / "models" / "initial", attn_implementation="eager")
    )
    state = torch.load(run / "checkpoints" / source / "mp_rank_00_model_states.pt", weights_only=False)
    model.load_state_dict({k.removeprefix("lm."): v for k, v in state["module"].items()})
    return model.eval()


@torch.no_grad()
def signals(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token (flat, sample by sample): log p(y_t) and the head-averaged attention
    mass of y_t's own position on the prompt, in the last layer."""
    logps, attns = [], []
    for lo in range(0, len(examples), BATCH):
        part = examples[lo : lo + BATCH]
        seqs = [e.prompt_ids + e.completion_ids for e in part]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        logp = out.logits.float().log_softmax(-1)
        last = out.attentions[-1].mean(1)  # [B, L, L]
        for i, e in enumerate(part):
            p = len(e.prompt_ids)
            pos = torch.arange(p, p + len(e.completion_ids))
            logps.append(logp[i, pos - 1, torch.tensor(e.completion_ids)])
            attns.append(last[i, pos, :p].sum(-1))
    return torch.cat(logps).double(), torch.cat(attns).double()


def select(cfg: SSTokenConfig, logp, logp_his, attn, seq_index) -> tuple[torch.Tensor, torch.Tensor]:
    rel_norm = normalised_rel(logp - logp_his, seq_index)
    score = cfg.gamma * rel_norm + (1 - cfg.gamma) * attn
    sizes = torch.bincount(seq_index)
    return top_per_sequence(score, seq_index, selected_counts(sizes, cfg.rho)), rel_norm


def kind(row: dict, answer: str, carry: bool) -> str:
    if not carry:
        return "no carry"
    return "carry, correct demo" if row["completion"] == answer else "carry, wrong demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="an ssToken run directory")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    args = parser.parse_args()
    run_cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    keys = {k: v for k, v in (run_cfg.get("algorithm") or {}).items() if k != "name"}
    cfg = SSTokenConfig(**keys)
    if cfg.history_model != "reference":
        raise SystemExit("this script reads the start model as the history model")
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    head = rows[: args.rows]
    print(check_token_ids(args.run, head, run_cfg["seed"], args.config))

    tok = char_tokenizer(TINY_ALPHABET)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "rows.jsonl"
        first_batch = EpochStream(len(rows), run_cfg["seed"]).take(run_cfg["batch_size"])
        path.write_text("".join(json.dumps(r) + "\n" for r in head + [rows[i] for i in first_batch]))
        examples, _ = load_sft_examples(path, tok)
    examples, step1 = examples[: len(head)], examples[len(head) :]
    seq_index = torch.cat([torch.full((len(e.completion_ids),), i) for i, e in enumerate(examples)])
    start = load_policy(args.run, "initial")
    logp_his, _ = signals(start, examples)
    _, attn1 = signals(start, step1)
    logged = json.loads((args.run / "metrics.jsonl").read_text().splitlines()[0])
    print(
        f"check: attention mean on step 1's mini-batch under the start model {attn1.mean():.6f}, "
        f"the run logged {logged.get('sstoken/attn_mean', float('nan')):.6f} (rel_mean "
        f"{logged.get('sstoken/rel_mean', float('nan')):.2e})"
    )

    problems = {}
    for r in head:
        a, b = map(int, r["prompt"][:-1].split("+"))
        problems[r["prompt"]] = (str(a + b), add_without_carry(a, b) != a + b)
    last = f"step_{run_cfg['steps']}"  # the final model's weights
    checkpoints = sorted(
        (p.name for p in (args.run / "checkpoints").glob("step_*") if p.name != last),
        key=lambda n: int(n[5:]),
    )
    for source in ["initial", *checkpoints, "final"]:
        logp, attn = signals(start if source == "initial" else load_policy(args.run, source), examples)
        selected, rel_norm = select(cfg, logp, logp_his, attn, seq_index)
        title = f"final model ({last})" if source == "final" else source
        print(f"\n## policy: {title} (gamma {cfg.gamma}, rho {cfg.rho}, {len(examples)} rows)")
        print(f"selected fraction {selected.double().mean():.3f}; NLL of all tokens {-logp.mean():.4f}")
        table = defaultdict(lambda: [0, 0, 0.0, 0.0, 0.0])  # selected, count, attn, rel', -logp
        lo = 0
        for r, e in zip(head, examples):
            n = len(e.completion_ids)
            answer, carry = problems[r["prompt"]]
            for t in range(n):
                name = "EOS" if t == n - 1 else f"digit {t + 1}"
                for key in ((n - 1, name), (n - 1, name, kind(r, answer, carry))):
                    cell = table[key]
                    cell[0] += int(selected[lo + t])
                    cell[1] += 1
                    cell[2] += float(attn[lo + t])
                    cell[3] += float(rel_norm[lo + t])
                    cell[4] -= float(logp[lo + t])
            lo += n
        print("| digits | token | rows | selected | Attn | REL' | NLL |")
        print("|---|---|---|---|---|---|---|")
        for key in sorted(table, key=lambda k: (k[0], k[1] == "EOS", k[1], k[2:])):
            s, c, a, rn, nll = table[key]
            label = key[1] if len(key) == 2 else f"{key[1]}, {key[2]}"
            print(f"| {key[0]} | {label} | {c} | {s / c:.3f} | {a / c:.3f} | {rn / c:.3f} | {nll / c:.3f} |")
        print("examples (selected tokens in [ ]; per token: Attn / REL'):")
        lo = 0
        for r, e in zip(head[: args.examples], examples):
            n = len(e.completion_ids)
            text = ["EOS" if i == tok.eos_token_id else tok.decode([i]) for i in e.completion_ids]
            marks = [f"[{c}]" if selected[lo + t] else f" {c} " for t, c in enumerate(text)]
            detail = ", ".join(f"{float(attn[lo + t]):.2f}/{float(rel_norm[lo + t]):.2f}" for t in range(n))
            answer, carry = problems[r["prompt"]]
            print(f"  {r['prompt']}{''.join(marks)}  ({kind(r, answer, carry)}; {detail})")
            lo += n


if __name__ == "__main__":
    main()
