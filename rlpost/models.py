"""Policy models: a tiny Llama built in code, or a local Hugging Face directory.

Rollout engines (vLLM in particular) load a model from a directory, so the
tiny model is always materialised as a normal HF directory (config.json,
safetensors, tokenizer.json) before anything starts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rlpost.config import ModelConfig

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def char_tokenizer(alphabet: str):
    """A fast tokenizer with one token per character of `alphabet` plus pad/bos/eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=PAD)


def build_tiny_model(cfg: ModelConfig, vocab_size: int, seed: int, max_len: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max_len,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype=cfg.dtype,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, cfg.dtype))


def materialise_initial_model(cfg: ModelConfig, alphabet: str, seed: int, out_dir: Path,
                              max_len: int = 512) -> Path:
    """Write the starting policy as a HF directory and return its path."""
    if cfg.kind == "hf":
        return Path(cfg.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer(alphabet)
    model = build_tiny_model(cfg, len(tokenizer), seed, max_len)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_model(path: str | Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
