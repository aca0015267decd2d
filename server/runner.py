"""A lean forward pass for llama-family HF models over a static per-slot KV cache.

It reuses the HF model's own modules (embedding, RMSNorms, q/k/v/o and gate/up/down projections,
which may be QuantLinear, and the rotary tables) but skips HF's generic cache and mask machinery,
which costs more than the matmuls for a 135M model on CPU."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitserve.errors import UsageError

SUPPORTED_TYPES = ("llama",)


def kv_bytes_per_slot(config: Any, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of K and V cache one sequence slot of `max_len` tokens needs."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    kv_heads = config.num_key_value_heads
    return 2 * layers * kv_heads * max_len * head_dim * torch.finfo(dtype).bits // 8


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF llama applies it (rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaRunner:
    """Runs [B, T] token blocks of sequences that each own one KV-cache slot."""

    def __init__(
        self, model: Any, num_slots: int, max_len: int, head_dtype: torch.dtype | None = None
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise UsageError(
                f"the serving engine runs llama-family models; {config.model_type!r} is not supported"
            )
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        # The vocabulary projection is the largest matmul; a bf16 copy halves the bytes it reads.
        self.head_weight = None
        if head_dtype is not None and isinstance(model.lm_head, nn.Linear):
            self.head_weight = model.lm_head.weight.detach().to(head_dtype)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.layers[0].self_attn.scaling
        self.num_slots, self.max_len = num_slots, max_len
        dtype = self.embed.weight.dtype
        shape = (len(self.layers), num_slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        with torch.inference_mode():
            cos, sin = inner.rotary_emb(self.k_cache[0, 0], torch.arange(max_len).unsqueeze(0))
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        starts: torch.Tensor,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append `ids` [B, T] at positions starts[b].. of each slot; return the logits [B, V]
        (float32) at position last[b] of each row (default T - 1).

        Rows may be right-padded: padding writes K/V past the row's length, which the causal mask
        never shows and the row's next real token overwrites before anything reads it."""
        B, T = ids.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        pos = (starts.unsqueeze(1) + torch.arange(T)).clamp_max(self.max_len - 1)  # [B, T]
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, T, D]
        kv_len = int(pos.max()) + 1
        mask = (torch.arange(kv_len).view(1, 1, kv_len) <= pos.unsqueeze(2)).unsqueeze(1)
        slot_col = slots.unsqueeze(1)
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            q = _rotate(attn.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
            k = _rotate(attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2), cos, sin)
            v = attn.v_proj(x).view(B, T, Hkv, D)
            self.k_cache[i][slot_col, :, pos] = k.transpose(1, 2)
            self.v_cache[i][slot_col, :, pos] = v
            keys = self.k_cache[i][slots, :, :kv_len]
            values = self.v_cache[i][slots, :, :kv_len]
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
            x = layer.post_attention_layernorm(h)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        rows = h[:, -1] if last is None else h[torch.arange(B), last]
        x = self.norm(rows)
        if self.head_weight is None:
            return self.lm_head(x).float()
        return F.linear(x.to(self.head_weight.dtype), self.head_weight).float()
