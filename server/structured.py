"""Structured outputs: an OpenAI `response_format` (json_object or json_schema), or vLLM's
`structured_outputs` (a JSON schema, a regex, a choice of strings or a Lark / GBNF grammar),
compiled by llguidance into a grammar over the model's tokens. Each constrained sequence carries a matcher;
every step it gives the set of tokens that keep the output valid (the others' logits become
-inf before sampling) and then consumes the token drawn, so the text always parses and its
last token completes it."""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import llguidance
import torch
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

# Compact JSON with Python's separators: with flexible whitespace a model may pad forever
# (a schema's own "x-guidance" options still override these).
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BITS = torch.arange(32, dtype=torch.int32)
COMPILED_GRAMMARS = 16


def json_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of JSON text valid against `schema`."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def regex_grammar(regex: str) -> str:
    """The grammar of text that `regex` (Rust regex syntax, anchored at both ends) matches."""
    return llguidance.LLMatcher.grammar_from_regex(regex)


def choice_grammar(choices: list[str]) -> str:
    """The grammar of exactly one of `choices` (each a Lark string literal; JSON's escapes
    are Lark's)."""
    return llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(json.dumps(c) for c in choices)
    )


def lark_grammar(grammar: str) -> str:
    """The grammar written in Lark, or in llama.cpp's GBNF (converted to Lark)."""
    try:
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(grammar))
    except GbnfToLarkError as e:
        raise ValueError(f"not a valid GBNF or Lark grammar: {e}") from None


class _Tokens:
    """The tokenizer as llguidance's TokenizerWrapper reads it: each id's bytes (the engine's
    `TokenBytes`, so any tokenizer the engine can stream works, not only the fast ones
    llguidance parses), the special ids, and text -> ids for the strings a grammar forces."""

    def __init__(self, tokenizer: Any, token_bytes: Any, vocab: int, eos_ids: list[int]) -> None:
        known = len(tokenizer)
        self.tokens = [token_bytes(i) if i < known else b"" for i in range(vocab)]
        # Special tokens never match text: those the detokenizer drops (which would vanish
        # from a JSON string the grammar counted them in) and every end-of-sequence id
        # (ending the text mid-string).
        special = token_bytes.special | set(eos_ids)
        self.special_token_ids = sorted(t for t in special if t < vocab)
        self.eos_token_id = eos_ids[0] if eos_ids else None
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class Constraints:
    """Matchers for one served model: its token table (built on first use, ~0.3 s for a 49k
    vocabulary), the end-of-sequence ids a finished grammar allows, and the last few compiled
    grammars (a client usually sends the same schema again; a matcher is copied from the
    compiled one in milliseconds, while compiling a large schema takes seconds)."""

    def __init__(self, tokenizer: Any, token_bytes: Any, vocab: int, eos_ids: set[int]) -> None:
        self.tokenizer, self.token_bytes = tokenizer, token_bytes
        self.vocab, self.eos_ids = vocab, sorted(eos_ids)
        self._table: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self.compiled = functools.lru_cache(maxsize=COMPILED_GRAMMARS)(self._compile)

    def table(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._table is None:
                tokens = _Tokens(self.tokenizer, self.token_bytes, self.vocab, self.eos_ids)
                self._table = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(tokens),
                    n_vocab=self.vocab,
                    eos_token=self.eos_ids or None,
                )
            return self._table

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        """`grammar` compiled; ValueError with llguidance's reason if it is invalid (an
        unknown type, a malformed or unsupported schema) or too large."""
        matcher = llguidance.LLMatcher(self.table(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matchers(self, grammar: str, count: int) -> list[llguidance.LLMatcher]:
        """`count` fresh matchers of `grammar` (one per sequence: each keeps its own state)."""
        compiled = self.compiled(grammar)
        return [compiled.deep_copy() for _ in range(count)]


def allowed_tokens(matchers: list[Any], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, vocab] bool on `device`: the tokens each row's matcher allows next (all of them for a
    row without one). llguidance writes a bitmask of 32 tokens per int32 word; the words cross
    to the device and are unpacked there."""
    words = torch.full((len(matchers), (vocab + 31) // 32), -1, dtype=torch.int32)
    for row, m in zip(words, matchers, strict=True):
        if m is not None:
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    words = words.to(device)
    bits = (words.unsqueeze(-1) >> _BITS.to(device)) & 1
    return bits.view(len(matchers), -1)[:, :vocab].bool()
