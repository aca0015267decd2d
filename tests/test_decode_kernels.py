"""The fused decode-step kernels (`bitserve.kernels.triton_decode`) against the runner's torch
ops, in Triton's CPU interpreter: residual add + RMSNorm, rotary + cache write, attention read
from the cache in place (GQA groups that are not powers of two, ragged lengths, one and several
length splits, NaN past a row's length), SiLU * up; then the runner's decode steps with them."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # set before triton is imported: kernels run on the CPU

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

fused = pytest.importorskip("bitserve.kernels.triton_decode")
if not pytest.importorskip(
    "bitserve.kernels.triton_int"
).INTERPRET:  # imported earlier in this process without the interpreter
    pytest.skip("triton_decode was imported without TRITON_INTERPRET=1", allow_module_level=True)

from bitserve.models import load_model  # noqa: E402
from bitserve.server.runner import LlamaRunner, _rotate  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm(dtype: torch.dtype, with_delta: bool) -> None:
    torch.manual_seed(1)
    h, delta, w = torch.randn(3, 200).to(dtype), torch.randn(3, 200).to(dtype), torch.randn(200)
    w = w.to(dtype)
    want_h = h + delta if with_delta else h.clone()
    want = F.rms_norm(want_h.float(), (200,), eps=1e-5).to(dtype) * w
    x = torch.full_like(h, float("nan"))
    fused.add_rms_norm(h, delta if with_delta else None, w, 1e-5, x)
    assert torch.equal(h, want_h)  # the residual stream is updated in place
    assert rel_err(x, want) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_to_cache_writes_each_rows_slot_and_position(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    b, heads, kv_heads, d, slots_n, max_len = 3, 6, 2, 24, 4, 16
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d).to(dtype)
    angles = torch.randn(max_len, d // 2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype)
    signed_sin = torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], dim=-1)
    slots, pos = torch.tensor([3, 0, 2]), torch.tensor([5, 0, 15])
    k_cache = torch.randn(slots_n, kv_heads, max_len, d).to(dtype)
    v_cache = torch.randn(slots_n, kv_heads, max_len, d).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    x = qkv.view(b, heads + 2 * kv_heads, d).float()
    rot = _rotate(
        x[:, : heads + kv_heads], cos[pos][:, None].float(), signed_sin[pos][:, None].float()
    )
    want_k[slots, :, pos] = rot[:, heads:].to(dtype)
    want_v[slots, :, pos] = x[:, heads + kv_heads :].to(dtype)
    q = fused.rope_to_cache(qkv, cos, signed_sin, pos, slots, k_cache, v_cache, heads)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # fp32 math, one rounding to fp16
    assert q.dtype == dtype and rel_err(q, rot[:, :heads]) < tol
    assert torch.equal(v_cache, want_v) and rel_err(k_cache, want_k) < tol
    # The rotation is HF's: q * cos + rotate_half(q) * sin.
    half = torch.cat([-x[:, :heads, d // 2 :], x[:, :heads, : d // 2]], dim=-1)
    hf = x[:, :heads] * cos[pos][:, None].float() + half * sin[pos][:, None].float()
    assert rel_err(q, hf) < tol


def attention_reference(q, k_cache, v_cache, slots, pos, scale):
    """Per row: softmax over keys 0..pos of its slot, GQA by repeating kv heads."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    out = []
    for i, (s, p) in enumerate(zip(slots.tolist(), pos.tolist(), strict=True)):
        k = k_cache[s, :, : p + 1].repeat_interleave(heads // kv_heads, dim=0).float()
        v = v_cache[s, :, : p + 1].repeat_interleave(heads // kv_heads, dim=0).float()
        att = torch.softmax(q[i].float()[:, None] @ k.transpose(1, 2) * scale, dim=-1)
        out.append((att @ v)[:, 0].reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "kv_len", "dtype"),
    [
        (6, 2, 24, 300, torch.float32),  # group of 3, D not a power of two, several splits
        (4, 2, 16, 40, torch.float32),  # one split: the output is written directly
        (8, 2, 32, 200, torch.float16),
    ],
)
def test_decode_attention(
    heads: int, kv_heads: int, d: int, kv_len: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(heads + d + kv_len)
    slots_n, max_len = 4, 320
    q = torch.randn(3, heads, d).to(dtype)
    k_cache = torch.randn(slots_n, kv_heads, max_len, d).to(dtype)
    v_cache = torch.randn(slots_n, kv_heads, max_len, d).to(dtype)
    slots, pos = torch.tensor([2, 0, 3]), torch.tensor([kv_len - 1, 0, kv_len // 3])
    for s, p in zip(slots.tolist(), pos.tolist(), strict=True):  # stale NaN past each length
        k_cache[s, :, p + 1 :] = float("nan")
        v_cache[s, :, p + 1 :] = float("nan")
    splits = fused.attention_splits(3, kv_heads, kv_len, q.device)
    assert (splits > 1) == (kv_len > fused.ATTN_BLOCK_L)
    out = fused.decode_attention(q, k_cache, v_cache, slots, pos, kv_len, d**-0.5)
    want = attention_reference(q, k_cache, v_cache, slots, pos, d**-0.5)
    assert out.shape == (3, heads * d) and torch.isfinite(out).all()
    assert rel_err(out, want) < (1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    gate_up = torch.randn(2, 2 * 1500).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate.float()).to(dtype).float() * up.float()  # torch's two ops' rounding
    got = fused.silu_mul(gate_up)
    assert got.dtype == dtype and rel_err(got, want) < (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("graphs", [False, True])
def test_runner_fused_decode_matches_torch_ops(
    server_tiny_checkpoint: Path, graphs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps through the fused kernels (each counted: every layer of every decode step
    runs them) give the torch ops' logits and KV cache, for ragged lengths and slots in any
    order, eager and through the static (graph) step; prefill stays on torch's ops."""
    calls: dict[str, int] = {}
    for name in ("add_rms_norm", "rope_to_cache", "decode_attention", "silu_mul"):
        real = getattr(fused, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args)

        monkeypatch.setattr(fused, name, counted)

    def model():  # the checkpoint's norms are all ones: distinct weights show a swapped norm
        m = load_model(server_tiny_checkpoint).model
        g = torch.Generator().manual_seed(11)
        for name, p in m.named_parameters():
            if "norm" in name:
                p.data = 1 + 0.5 * torch.randn(p.shape, generator=g)
        return m

    ref = LlamaRunner(model(), num_slots=3, max_len=64)
    ref.cpu_decode = None  # torch's ops, not the one-C-call step
    runner = LlamaRunner(
        model(),
        num_slots=3,
        max_len=64,
        decode_graphs=graphs,
        fused_decode=True,
    )
    assert not ref.fused_decode  # the CPU default
    lens = [9, 3, 14]
    for r in (ref, runner):
        for slot, n in enumerate(lens):
            ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(slot))
            r.forward(ids, torch.tensor([slot]), torch.tensor([0]))
    assert not calls  # prefill
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        slots = [2, 0, 1] if step % 2 else [1, 2]
        ids = torch.randint(0, 1000, (len(slots), 1), generator=g)
        starts = torch.tensor([lens[s] for s in slots])
        a = ref.forward(ids, torch.tensor(slots), starts)
        b = runner.forward(ids, torch.tensor(slots), starts)
        # 1e-4: fp32 attention rounds differently here, and the cpu backend's int16-activation
        # kernel passes that on where bf16 activations rounded it away (2.4e-5 seen)
        assert rel_err(b, a) < 1e-4, step
        for s in slots:
            lens[s] += 1
    # a prompt's last chunk of one token in each row (the engine's prefill, `last` given) runs
    # the fused kernels too, over each row's own length
    ids = torch.randint(0, 1000, (2, 1), generator=g)
    starts, last = torch.tensor([lens[0], lens[2]]), torch.zeros(2, dtype=torch.long)
    a = ref.forward(ids, torch.tensor([0, 2]), starts, last)
    b = runner.forward(ids, torch.tensor([0, 2]), starts, last)
    assert torch.isfinite(b).all() and rel_err(b, a) < 1e-4
    assert rel_err(runner.k_cache[:, :3], ref.k_cache) < 1e-4
    assert rel_err(runner.v_cache[:, :3], ref.v_cache) < 1e-4
    layers = len(runner.layers)
    # a static step runs once more per shape, before its capture; then the one-token prefill
    steps = 3 + int(graphs) * 2 + 1
    assert calls == {
        "add_rms_norm": steps * (2 * layers + 1),
        "rope_to_cache": steps * layers,
        "decode_attention": steps * layers,
        "silu_mul": steps * layers,
    }
