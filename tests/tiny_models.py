"""Small random-init causal LMs of several architectures, saved as HF folders with a
character-level tokenizer, so tests exercise real loading code without any download."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
SPECIALS = ["<unk>", "<s>", "</s>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (plus <unk>, <s>, </s>) and a minimal chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def tiny_config(arch: str = "llama", layers: int = 2) -> PretrainedConfig:
    """Sizes chosen so that group sizes 64 and 128 leave short last groups (96 and 160 inputs)."""
    common = dict(
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=arch != "mistral",
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)  # q/k/v carry biases
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=128)
    raise ValueError(arch)


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, layers: int = 2) -> Path:
    """Random-init model of `arch` written as an HF folder (fp32 safetensors + tokenizer)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers))
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
