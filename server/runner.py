"""A lean forward pass for llama-family HF models over a static per-slot KV cache.

It reuses the HF model's own modules (embedding, RMSNorms, q/k/v/o and gate/up/down projections,
which may be QuantLinear, and the rotary tables) but skips HF's generic cache and mask machinery,
which costs more than the matmuls for a 135M model on CPU."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitserve.errors import UsageError
from bitserve.kernels.cpu import native_dense_rows
from bitserve.kernels.quant_linear import BACKENDS, QuantLinear, concat_outputs
from bitserve.quantization.grid import QuantSpec, quantize_rtn

SUPPORTED_TYPES = ("llama",)
# Decode batches are padded up to one of these sizes, so that a few captured graphs serve any
# batch (larger batches run eager); attention reads the cache up to a power-of-two length of at
# least GRAPH_MIN_KV.
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Prefill lengths the warm-up runs: one in each M bucket of the Triton tuner (kernels/triton_int.py
# `bucket`) past M = 1, so that no short prompt waits for a tuning.
WARMUP_PREFILLS = (2, 4, 16, 64, 256, 1024)
GRAPH_MIN_KV = 256
# Eager CUDA steps leave out cuDNN attention: it plans anew for every new shape, and an eager
# step's attention length changes every token (docs/kernels.md, GPU runs 6 and 7).
EAGER_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
log = logging.getLogger("bitserve.runner")


def _triton_int() -> Any:
    """The Triton backend module where Triton is installed (its PDL switch), else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    from bitserve.kernels import triton_int

    return triton_int


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: a plain copy to a GPU from pageable
    memory blocks until the stream is idle, one from pinned memory does not (torch's pinned
    allocator keeps the block alive until the copy is done)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def kv_bytes_per_slot(config: Any, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of K and V cache one sequence slot of `max_len` tokens needs."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    kv_heads = config.num_key_value_heads
    return 2 * layers * kv_heads * max_len * head_dim * torch.finfo(dtype).bits // 8


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) for a weight reordered by `onednn_weight`, in x's dtype."""
    if bias is not None:
        bias = bias.to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A CPU weight [N, K] reordered once into oneDNN's blocked layout: torch's plain bf16 GEMV
    leaves most of the memory bandwidth unused, the reordered one runs the default model's
    lm_head about 2x faster at 1-16 rows with the same result (bench/head_dtype.py). None where
    oneDNN is missing here or its answer on a random input is not F.linear's."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    x = torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(weight.dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        got = onednn_linear(x, packed, None)
        alone = onednn_linear(x[3:4], packed, None)
    except (RuntimeError, AttributeError) as e:  # a build without the op, or one that refuses
        log.info("lm_head keeps torch's plain layout (%s)", e)
        return None
    want = F.linear(x, weight).float()
    if (got.float() - want).norm() > 1e-3 * want.norm():
        log.warning("oneDNN's reordered lm_head differs from F.linear: keeping the plain layout")
        return None
    if not torch.equal(alone[0], got[3]):  # the runner's rows must not depend on the batch
        log.warning("oneDNN's reordered lm_head rounds rows by batch: keeping the plain layout")
        return None
    return packed


def auto_head_dtype(weight: torch.Tensor) -> torch.dtype:
    """`--head-dtype auto` for an lm_head weight [N, K]: int8 on a CPU where bitserve's own
    kernel runs and takes the head's shape (as W8 g32) and oneDNN's bf16 matmul does not (plain
    AVX2: there torch's bf16 head is 3x slower than the int8 one at one row and 5x at 16, and
    no closer to fp32; docs/serving.md), else bfloat16."""
    from bitserve.kernels import cpu_native

    lib = cpu_native.library() if weight.device.type == "cpu" and weight.dim() == 2 else None
    if lib is None or not cpu_native.accepts(lib, 8, weight.shape[1], weight.shape[0], 32):
        return torch.bfloat16
    probe = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    return torch.bfloat16 if onednn_weight(probe) is not None else torch.int8


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF llama applies it (rotate_half convention): rotate_half(x) * sin is
    the half-rolled x times sin with its first half negated."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _kv(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New keys and values in the cache's dtype (fp16 on a CPU with --kv-cache-dtype float16),
    rounded to nearest as the C step writes them."""
    return k.to(cache.dtype), v.to(cache.dtype)


def _fuse(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> tuple[nn.Module, ...]:
    """The projections `names` of `parent` as one module computing their outputs side by side,
    registered as `fused_name` in place of the originals (whose memory is freed); the originals
    unchanged when they cannot be fused (e.g. BCQ or mixed-precision layers)."""
    if hasattr(parent, fused_name):  # a runner already took this model over
        return (getattr(parent, fused_name),)
    mods = [getattr(parent, n) for n in names]
    fused: nn.Module | None = None
    if all(isinstance(m, QuantLinear) for m in mods):
        fused = concat_outputs(mods)
    elif all(type(m) is nn.Linear for m in mods) and len({m.bias is None for m in mods}) == 1:
        out = sum(m.out_features for m in mods)  # built on meta: its own init would be wasted
        fused = nn.Linear(mods[0].in_features, out, bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
        if mods[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
    if fused is None:
        return tuple(mods)
    for n in names:
        delattr(parent, n)
    parent.add_module(fused_name, fused)
    return (fused,)


def _project(mods: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    """Outputs of a (fused or not) projection group, side by side."""
    return mods[0](x) if len(mods) == 1 else torch.cat([m(x) for m in mods], dim=-1)


@dataclass
class _Layer:
    """One decoder layer's weights as the runner uses them."""

    attn_norm: Any  # HF's RMSNorm modules: .weight, .variance_epsilon
    qkv: tuple[nn.Module, ...]
    o: nn.Module
    mlp_norm: Any
    gate_up: tuple[nn.Module, ...]
    down: nn.Module
    act: nn.Module


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


Project = tuple[torch.dtype | None, Callable[[torch.Tensor], torch.Tensor]]


def _direct(mods: tuple[nn.Module, ...]) -> Project | None:
    """A fused projection as `LlamaRunner._cpu_step` calls it on [B, K] rows: the dtype its
    input should come in (None: the residual stream's) and the function, the backend's direct
    kernel call where it has one (`Backend.direct`); None for an unfused group."""
    if len(mods) != 1:
        return None
    mod = mods[0]
    if isinstance(mod, QuantLinear):
        direct = BACKENDS[mod.backend].direct
        found = None if direct is None else direct(mod)
        return found or (None, mod)
    if type(mod) is nn.Linear:
        return None, functools.partial(F.linear, weight=mod.weight, bias=mod.bias)
    return None, mod


@dataclass
class _Rows:
    """One decoder layer as the CPU decode loop runs it: the projections (`_direct`), the two
    norms' weights and epsilons and the MLP's activation, looked up once (module attribute
    lookups and calls cost more than the small ops they wrap)."""

    qkv: Project
    o: Project
    gate_up: Project
    down: Project
    attn_norm: tuple[torch.Tensor, float]
    mlp_norm: tuple[torch.Tensor, float]
    act: Callable[[torch.Tensor], torch.Tensor]


def _cpu_rows(layers: list[_Layer], silu: bool) -> list[_Rows] | None:
    """The layers as `_Rows`; None if a projection group is not one module (not fused)."""
    rows = []
    for x in layers:
        qkv, o, gate_up, down = (_direct(m) for m in (x.qkv, (x.o,), x.gate_up, (x.down,)))
        if qkv is None or o is None or gate_up is None or down is None:
            return None
        attn_norm = (x.attn_norm.weight, x.attn_norm.variance_epsilon)
        mlp_norm = (x.mlp_norm.weight, x.mlp_norm.variance_epsilon)
        rows.append(_Rows(qkv, o, gate_up, down, attn_norm, mlp_norm, F.silu if silu else x.act))
    return rows


def _native_projection(mods: tuple[nn.Module, ...]) -> Any:
    """A fused projection as `cpu_native.decoder` takes it, where it is one QuantLinear packed
    for our own kernel; else None."""
    mod = mods[0]
    if len(mods) != 1 or not isinstance(mod, QuantLinear) or "native_weight" not in mod.prepared:
        return None
    return mod.prepared, mod.group_size, None if mod.bias is None else mod.bias.detach()


def _norm_into(norm: tuple[torch.Tensor, float], h: torch.Tensor, dtype: Any) -> torch.Tensor:
    """_rms_norm of fp32 rows h rounded once into `dtype` (None: h's), the next matmul's
    input, instead of cast by a second op: the same values."""
    weight, eps = norm
    out = torch.empty(h.shape, dtype=dtype or h.dtype)
    return torch.mul(F.rms_norm(h, weight.shape, None, eps), weight, out=out)


@dataclass
class _Decode:
    """Static inputs and output of a decode step of `batch` rows attending to `kv_len` cache
    positions, and how to run it: a CUDA graph replay, or (on the CPU) the step itself. The
    inputs are rows of one [3, batch] buffer (token ids, slots, positions), filled by one copy."""

    inputs: torch.Tensor
    run: Any = None
    logits: torch.Tensor | None = None

    @property
    def ids(self) -> torch.Tensor:
        return self.inputs[0].unsqueeze(1)

    @property
    def slots(self) -> torch.Tensor:
        return self.inputs[1]

    @property
    def pos(self) -> torch.Tensor:
        return self.inputs[2].unsqueeze(1)


class LlamaRunner:
    """Runs [B, T] token blocks of sequences that each own one KV-cache slot.

    It takes the model over: each layer's q/k/v and gate/up projections are fused into one
    matmul each (one kernel call, one activation cast) and the originals are freed, so the
    model's own HF forward no longer runs afterwards; QuantLinears whose backend keeps its own
    repacked weights release the checkpoint's packed copy.

    decode_graphs (default: on CUDA): one-token decode steps run from CUDA graphs captured per
    (padded batch, attention length) on first use, since launching a step's few hundred kernels
    from Python costs more than the step itself; padded rows write to a spare cache slot. On
    the CPU the same static step runs without capture (tests).

    fused_decode (default: on CUDA with Triton): one-token steps run the ops between the
    matmuls as fused Triton kernels (`bitserve.kernels.triton_decode`: residual add + norm,
    rotary + cache write, attention read from the cache in place, SiLU * up). On the CPU,
    one-token steps of an fp32 model whose projections all run on our own kernel run every
    layer in one C call (`cpu_decode`, kernels/cpu_decode.c); of other fp32 models,
    `_cpu_step`: the generic step's arithmetic in fewer ops."""

    def __init__(
        self,
        model: Any,
        num_slots: int,
        max_len: int,
        head_dtype: torch.dtype | None = None,
        decode_graphs: bool | None = None,
        fused_decode: bool | None = None,
        kv_dtype: torch.dtype | str | None = None,
        kv_cache_mib: float | None = None,
    ) -> None:
        """kv_dtype: the K/V cache's element type (default: the model's; fp16 for an fp32 model
        on the CPU halves it); "auto": fp16 where the C step runs, whose attention widens fp16
        as it loads it (torch's ops would widen the whole slice they attend to at every step),
        else the model's. kv_cache_mib: a cap on the cache, which lowers num_slots to fit."""
        config = model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise UsageError(
                f"the serving engine runs llama-family models; {config.model_type!r} is not supported"
            )
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = [
            _Layer(
                layer.input_layernorm,
                _fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                layer.self_attn.o_proj,
                layer.post_attention_layernorm,
                _fuse(layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj"),
                layer.mlp.down_proj,
                layer.mlp.act_fn,
            )
            for layer in inner.layers
        ]
        for module in model.modules():
            if isinstance(module, QuantLinear) and module.backend != "reference":
                module.release_packed()
        self.norm = inner.norm
        self.lm_head = model.lm_head
        # The vocabulary projection is the largest matmul; a bf16 copy halves the bytes it reads.
        # int8 (on the CPU): an RTN W8 g32 copy instead, run by the cpu backend (our kernel where
        # it builds), a quarter of fp32's bytes and closer to fp32 than bf16; 3-5x torch's plain
        # bf16 head; against the oneDNN one measured only as torch's two nibble planes, slower
        # from four rows (docs/serving.md).
        self.head_weight: torch.Tensor | None = None
        self.head_int8: QuantLinear | None = None
        head = model.lm_head
        if not isinstance(head, nn.Linear) or head_dtype is None:
            pass
        elif head_dtype == torch.int8 and head.weight.device.type == "cpu":
            w8 = quantize_rtn(head.weight.detach(), QuantSpec(8, 32, sym=True)).to_module(
                None if head.bias is None else head.bias.detach()
            )
            w8.set_backend("cpu")
            w8.release_packed()  # the cpu backend's repacked copy is all it needs
            self.head_int8 = w8
        elif head_dtype == torch.int8:
            log.warning("an int8 lm_head runs on the CPU only: keeping the model's own head")
        elif head_dtype.is_floating_point and head_dtype.itemsize < head.weight.dtype.itemsize:
            self.head_weight = head.weight.detach().to(head_dtype)
        # On the CPU the bf16 copy is kept in oneDNN's blocked layout, which halves its time.
        self.head_bias = None if head.bias is None else head.bias.detach()
        self.head_onednn = False
        if self.head_weight is not None and self.head_weight.dtype == torch.bfloat16:
            packed = onednn_weight(self.head_weight)
            if packed is not None:
                self.head_weight, self.head_onednn = packed, True
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = inner.layers[0].self_attn.scaling
        dtype, self.device = self.embed.weight.dtype, self.embed.weight.device
        self.silu = config.hidden_act in ("silu", "swish")  # the MLP's act_fn, fused with up
        # One-token CPU steps in fewer ops (`_cpu_step`), for an fp32 model whose groups fused.
        cpu_fp32 = self.device.type == "cpu" and dtype == torch.float32
        self.cpu_rows = _cpu_rows(self.layers, self.silu) if cpu_fp32 else None
        # ... and, where every projection runs on our own kernel, the whole step in one C call.
        native = self._native_layers() if cpu_fp32 and self.silu else None
        if kv_dtype == "auto":
            kv_dtype = torch.float16 if native is not None else dtype
        elif kv_dtype is None:
            kv_dtype = dtype
        if not isinstance(kv_dtype, torch.dtype):
            raise ValueError(f"kv_dtype takes a torch dtype, None or 'auto', not {kv_dtype!r}")
        narrower = self.device.type == "cpu" and (dtype, kv_dtype) == (torch.float32, torch.float16)
        if kv_dtype != dtype and not narrower:
            name = str(kv_dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")
            raise UsageError(
                f"--kv-cache-dtype {name[0]}: a {name[1]} model on {self.device.type} keeps its "
                "K/V in its own dtype (only an fp32 model on the CPU may narrow them to float16)"
            )
        self.decode_graphs = self.device.type == "cuda" if decode_graphs is None else decode_graphs
        # With decode graphs, one spare slot past the last: padded rows write there.
        spare = int(self.decode_graphs)
        if kv_cache_mib is not None:
            per_slot = kv_bytes_per_slot(config, max_len, kv_dtype)
            num_slots = min(num_slots, int(kv_cache_mib * 2**20 // per_slot) - spare)
            if num_slots < 1:
                raise UsageError(
                    f"--kv-cache-mib {kv_cache_mib:g} holds no sequence of --max-model-len "
                    f"{max_len} ({per_slot / 2**20:.1f} MiB each)"
                )
        self.num_slots, self.max_len = num_slots, max_len
        shape = (len(self.layers), num_slots + spare, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=kv_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype, device=self.device)
        with torch.inference_mode():
            positions = torch.arange(max_len, device=self.device).unsqueeze(0)
            cos, sin = inner.rotary_emb(self.embed.weight, positions)  # in the model's dtype
        half = self.head_dim // 2
        self.cos = cos[0]  # [max_len, head_dim]
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        if fused_decode is None:
            fused_decode = self.device.type == "cuda" and _triton_int() is not None
        self.fused_decode = fused_decode
        self.cpu_decode = None if native is None else self._cpu_decoder(native)
        self._graphable = self.device.type == "cuda"  # capture decode steps (else run them)
        self._decodes: dict[tuple[int, int], _Decode] = {}
        self._pool: Any = None  # one CUDA graph memory pool for every captured step

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        starts: torch.Tensor,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append `ids` [B, T] at positions starts[b].. of each slot; return the logits [B, V]
        at position last[b] of each row (default T - 1), float32 on the model's device (sampling
        copies to the host only what it needs). The index tensors may live on the CPU whatever
        the model's device.

        Rows may be right-padded: padding may write K/V past the row's length, which no
        attention reads and the row's next real token overwrites. A row's logits do not depend
        on the other rows on the CPU (greedy texts are the same alone or batched): attention
        runs row by row (`_attend_rows`, or the C step's rows), other ops row-wise; the cpu
        backend's dense path for many rows (docs/kernels.md) is the exception."""
        B, T = ids.shape
        if T == 1 and last is None and self.decode_graphs and GRAPH_BATCHES[-1] >= B:
            return self._decode(ids, slots, starts)
        # Each row's (slot, start, real tokens), from the (usually CPU) index tensors: no wait
        # for the GPU.
        lengths = [T] * B if last is None else [n + 1 for n in last.tolist()]
        spans = list(zip(slots.tolist(), starts.tolist(), lengths, strict=True))
        kv_len = min(max(start + n for _, start, n in spans), self.max_len)
        ids, starts, slots = (to_device(t, self.device) for t in (ids, starts, slots))
        steps = torch.arange(T, device=self.device)
        pos = (starts.unsqueeze(1) + steps).clamp_max(self.max_len - 1)  # [B, T]
        cuda = self.device.type == "cuda"
        # On CUDA one masked call: a call per row would be a launch per row and layer (and its
        # other kernels already differ by batch size, so nothing would be gained).
        with sdpa_kernel(EAGER_SDPA) if cuda else contextlib.nullcontext():
            return self._step(ids, slots, pos, kv_len, last, None if cuda else spans).float()

    def synchronize(self) -> None:
        """Wait until the device has run everything queued (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def warmup(self, prefill_tokens: int) -> list[tuple[str, int]]:
        """Run what serving will run before the first request: a prefill in each M bucket of
        the matmul tuner up to `prefill_tokens` (Triton tunes each layer shape per bucket) and a
        decode step at each padded batch size up to the slot count (captured as a CUDA graph
        with decode_graphs); the cache is zeroed after. Call it before serving: it writes to
        slots that sequences may hold. Logs each run and its time (the first ones tune and
        compile: tens of seconds on a GPU without saved configs). Returns (kind, rows) per run."""
        runs = [
            ("prefill", t)
            for t in sorted({min(t, prefill_tokens, self.max_len) for t in WARMUP_PREFILLS})
        ]
        batches = [b for b in GRAPH_BATCHES if b < self.num_slots]
        batches.append(next((b for b in GRAPH_BATCHES if b >= self.num_slots), self.num_slots))
        runs += [("decode", min(b, self.num_slots)) for b in batches]
        for i, (kind, n) in enumerate(runs):
            t0 = time.perf_counter()
            if kind == "prefill":  # one row of n tokens
                self.forward(
                    torch.zeros(1, n, dtype=torch.long), torch.tensor([0]), torch.tensor([0])
                )
            else:  # n rows of one token
                ids, slots = torch.zeros(n, 1, dtype=torch.long), torch.arange(n)
                self.forward(ids, slots, torch.zeros(n, dtype=torch.long))
            log.info(
                "warm-up %d/%d: %s of %d %s, %.1f s",
                i + 1,
                len(runs),
                kind,
                n,
                "tokens" if kind == "prefill" else "rows",
                time.perf_counter() - t0,
            )
        self.k_cache.zero_()  # no sequence holds a slot yet
        self.v_cache.zero_()
        return runs

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        """Zero a slot's K/V: attention masks stale positions past a sequence's length, but a
        NaN or inf left there by an earlier occupant still turns the masked softmax into NaN
        (graphed steps always read at least GRAPH_MIN_KV positions)."""
        self.k_cache[:, slot].zero_()
        self.v_cache[:, slot].zero_()

    def copy_positions(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy K/V positions [start, end) of slot src into slot dst (choices of one prompt
        share its prefill: the same values their own prefill would have written)."""
        self.k_cache[:, dst, :, start:end] = self.k_cache[:, src, :, start:end]
        self.v_cache[:, dst, :, start:end] = self.v_cache[:, src, :, start:end]

    def _decode(self, ids: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """A one-token step of B rows through the static step for (padded batch, attention
        length); the lengths come from the CPU index tensors, so nothing waits on the GPU."""
        B = ids.shape[0]
        batch = next(b for b in GRAPH_BATCHES if b >= B)
        need = int(starts.max()) + 1
        kv_len = min(self.max_len, max(GRAPH_MIN_KV, 1 << (need - 1).bit_length()))
        step = self._decodes.get((batch, kv_len)) or self._capture(batch, kv_len)
        inputs = torch.zeros(3, batch, dtype=torch.long)
        inputs[1] = self.num_slots  # padded rows write to the spare slot
        inputs[0, :B], inputs[1, :B] = ids[:, 0], slots
        inputs[2, :B] = starts.clamp_max(self.max_len - 1)
        pinned = inputs.pin_memory() if self.device.type == "cuda" else inputs
        step.inputs.copy_(pinned, non_blocking=True)  # one copy, no wait for the GPU
        step.run()
        assert step.logits is not None
        # Copied out before any other replay: the graphs share one memory pool, so another
        # graph's temporaries may live where these logits are.
        return step.logits[:B].to(torch.float32, copy=True)

    def _capture(self, batch: int, kv_len: int) -> _Decode:
        """The static decode step for (batch, kv_len): run once (Triton tuning, workspaces), then
        captured into a CUDA graph on CUDA. Its inputs point at the spare slot meanwhile, so the
        warm-up writes nothing that a sequence reads. A failed capture falls back to eager."""
        dev = self.device
        inputs = torch.zeros(3, batch, dtype=torch.long, device=dev)
        inputs[1] = self.num_slots
        step = _Decode(inputs)

        def run() -> None:
            step.logits = self._step(step.ids, step.slots, step.pos, kv_len, None, None)

        run()
        step.run = run
        if self._graphable:
            step.run = self._graph(run) or run
        self._decodes[(batch, kv_len)] = step
        return step

    def _graph(self, run: Any) -> Any:
        """`run` (already run once, eagerly) captured into a CUDA graph: its replay. If capture
        fails with Triton's programmatic dependent launch on (a driver that cannot capture it),
        PDL is turned off for the process and capture retried; if that fails too (e.g. a kernel
        that syncs), PDL is turned back on and decode steps run eager from then on (None)."""
        try:
            return self._replay(run)
        except Exception as e:
            error = e
        triton_int = _triton_int()
        if triton_int is not None and triton_int.use_pdl(self.device):
            log.warning(
                "capture failed with programmatic dependent launch on (%s): retrying without it",
                error,
            )
            triton_int.PDL_ENABLED = False
            try:
                run()  # compiles the kernels without PDL before capture
                return self._replay(run)
            except Exception as e:  # not PDL's doing after all: keep it for eager steps
                error = e
                triton_int.PDL_ENABLED = True
        log.warning("decode step not captured in a CUDA graph (%s): running eager", error)
        self.decode_graphs = False
        run()
        return None

    def _replay(self, run: Any) -> Any:
        """Capture `run` into a CUDA graph in the shared pool; its replay. The current stream
        is restored even when capture fails (torch.cuda.graph leaves its capture stream current
        if ending the capture raises)."""
        stream = torch.cuda.current_stream(self.device)
        try:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                run()
            self._pool = graph.pool()
            return graph.replay
        finally:
            torch.cuda.set_stream(stream)

    def _step(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        pos: torch.Tensor,
        kv_len: int,
        last: torch.Tensor | None,
        spans: list[tuple[int, int, int]] | None,
    ) -> torch.Tensor:
        """The forward on device tensors (ids, slots, positions pos [B, T]): logits [B, V] in
        the head's dtype, without a host sync. spans (slot, start, real tokens) per row: each row
        attends alone over exactly its own keys (`_attend_rows`, the CPU); None (CUDA, and the
        static decode step): all rows at once over the first kv_len positions, masked."""
        B, T = ids.shape
        if T == 1 and self.fused_decode:
            return self._fused_step(ids[:, 0], slots, pos[:, 0], kv_len)
        # The C step (CPU): rows that fit the cache, with at least one real token each.
        c_step, c_spans = self.cpu_decode, spans or []
        fit = all(n >= 1 and s + n <= self.max_len for _, s, n in c_spans)
        if c_step and c_spans and fit and sum(n for _, _, n in c_spans) < native_dense_rows():
            if T == 1:
                h = self.embed(ids[:, 0])
                c_step(h, slots, pos[:, 0])
                return self._head(self.norm(h))
            return self._c_prefill(ids, c_spans)
        if T == 1 and spans is not None and self.cpu_rows is not None:
            return self._cpu_step(ids[:, 0], slots, pos[:, 0], spans)
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[pos].unsqueeze(2), self.signed_sin[pos].unsqueeze(2)  # [B, T, 1, D]
        if spans is None:
            keys_at = torch.arange(kv_len, device=self.device).view(1, 1, kv_len)
            mask = (keys_at <= pos.unsqueeze(2)).unsqueeze(1)
        else:  # causal masks of the rows with more than one query: key k <= start + t
            masks = [
                None
                if n == 1
                else torch.arange(start + n, device=self.device)
                <= start + torch.arange(n, device=self.device).unsqueeze(1)
                for _, start, n in spans
            ]
        slot_col = slots.unsqueeze(1)
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x = _rms_norm(layer.attn_norm, h)
            qkv = _project(layer.qkv, x).view(B, T, H + 2 * Hkv, D)
            qk = _rotate(qkv[:, :, : H + Hkv], cos, sin)
            k, v = self.k_cache[i], self.v_cache[i]
            k[slot_col, :, pos], v[slot_col, :, pos] = _kv(qk[:, :, H:], qkv[:, :, H + Hkv :], k)
            q = qk[:, :, :H].transpose(1, 2)
            if spans is None:
                o = F.scaled_dot_product_attention(
                    q,
                    k[slots, :, :kv_len].to(q.dtype),
                    v[slots, :, :kv_len].to(q.dtype),
                    attn_mask=mask,
                    scale=self.scale,
                    enable_gqa=True,
                )
            else:
                o = self._attend_rows(q, k, v, spans, masks)
            h = h + layer.o(o.transpose(1, 2).reshape(B, T, H * D))
            gate, up = _project(layer.gate_up, _rms_norm(layer.mlp_norm, h)).chunk(2, dim=-1)
            h = h + layer.down(layer.act(gate) * up)
        if last is None:
            x = self.norm(h[:, -1])
        else:
            x = self.norm(h[torch.arange(B, device=self.device), to_device(last, self.device)])
        return self._head(x)

    def _cpu_step(
        self, ids: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, spans: list[Any]
    ) -> torch.Tensor:
        """`_step` for one token per row on the CPU (ids, slots, pos: [B]): the same arithmetic,
        so the same logits bit for bit, in fewer ops (1.1x faster at one row, docs/serving.md):
        2-D rows, each projection called directly (`_direct`), norms and the activation written
        straight in the dtype the next matmul reads."""
        assert self.cpu_rows is not None
        B, H, Hkv, D = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[pos].unsqueeze(1), self.signed_sin[pos].unsqueeze(1)  # [B, 1, D]
        h = self.embed(ids)
        for i, rows in enumerate(self.cpu_rows):
            (qkv_dtype, qkv_fn), (o_dtype, o_fn) = rows.qkv, rows.o
            qkv = qkv_fn(_norm_into(rows.attn_norm, h, qkv_dtype)).float().view(B, -1, D)
            qk = _rotate(qkv[:, : H + Hkv], cos, sin)
            k, v = self.k_cache[i], self.v_cache[i]
            k[slots, :, pos], v[slots, :, pos] = _kv(qk[:, H:], qkv[:, H + Hkv :], k)
            o = self._attend_rows(qk[:, :H].unsqueeze(2), k, v, spans, [], o_dtype)
            h = h + o_fn(o.view(B, H * D))
            (gu_dtype, gu_fn), (down_dtype, down_fn) = rows.gate_up, rows.down
            gate, up = gu_fn(_norm_into(rows.mlp_norm, h, gu_dtype)).float().chunk(2, dim=-1)
            act = torch.empty(gate.shape, dtype=down_dtype or h.dtype)
            h = h + down_fn(torch.mul(rows.act(gate), up, out=act))
        return self._head(self.norm(h))

    def _native_layers(self) -> list[list[Any]] | None:
        """Each layer's four projections as `cpu_native.decoder` takes them, where our own CPU
        kernel builds here, heads are of 8k values and every projection runs on it; else None."""
        from bitserve.kernels import cpu_native

        if cpu_native.library() is None or self.head_dim % 8:
            return None
        layers = []
        for x in self.layers:
            projections = [_native_projection(m) for m in (x.qkv, (x.o,), x.gate_up, (x.down,))]
            if any(p is None for p in projections):
                return None
            layers.append(projections)
        return layers

    def _cpu_decoder(
        self, native: list[list[Any]]
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
        """The one-token step of a model whose projections all run on our own CPU kernel
        (`native`, from `_native_layers`), as one C call for every layer (`cpu_native.decoder`:
        norms, rotary, cache writes and attention in plain loops between the matmuls, 2-3x
        faster than `_cpu_step`'s torch ops, docs/serving.md), which also runs prompt chunks as
        rows (`_c_prefill`); None (with a warning) where the C cannot read the weights. Its
        logits match torch's ops' to about 1e-4, not bit for bit (sums in another order flip
        some int16 roundings of the activations)."""
        from bitserve.kernels import cpu_native

        lib = cpu_native.library()
        assert lib is not None  # `_native_layers` found it
        layers = []
        for i, (x, projections) in enumerate(zip(self.layers, native, strict=True)):
            norms = [
                (n.weight.detach(), float(n.variance_epsilon)) for n in (x.attn_norm, x.mlp_norm)
            ]
            layers.append(
                cpu_native.DecodeLayer(*projections, *norms, self.k_cache[i], self.v_cache[i])
            )
        try:
            return cpu_native.decoder(
                lib, layers, self.heads, self.cos, self.signed_sin, self.scale
            )
        except ValueError as e:
            log.warning("one-token CPU steps keep torch's ops between the matmuls: %s", e)
            return None

    def _attend_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        spans: list[tuple[int, int, int]],
        masks: list[torch.Tensor | None],
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Attention of each row's real queries q[b, :, :n] over its own slot's keys up to
        start + n, one call per row: the same call, so the same arithmetic, whether a sequence
        runs alone or beside others of other lengths. (One masked call over the padded batch
        rounds a row differently, by its length and by how torch splits the batch over
        threads, and the 16-bit casts of the quantized matmuls carried that into different
        greedy texts.) A one-token row (decode) stacks each KV head's query heads as its
        queries: no mask, no GQA expansion, as fast as the batched call; its output comes in
        `dtype` (default q's), rounded once. Padding queries give zeros."""
        B, H, T, D = q.shape
        group = H // self.kv_heads
        if T == 1:  # decode
            out = torch.empty(q.shape, dtype=dtype or q.dtype)
            for b, (slot, start, _) in enumerate(spans):
                out[b] = F.scaled_dot_product_attention(
                    q[b, :, 0].view(1, self.kv_heads, group, D),
                    k[slot : slot + 1, :, : start + 1].to(q.dtype),
                    v[slot : slot + 1, :, : start + 1].to(q.dtype),
                    scale=self.scale,
                ).view(H, 1, D)
            return out
        o = torch.zeros_like(q)
        for b, ((slot, start, n), mask) in enumerate(zip(spans, masks, strict=True)):
            o[b, :, :n] = F.scaled_dot_product_attention(
                q[b : b + 1, :, :n],
                k[slot : slot + 1, :, : start + n].to(q.dtype),
                v[slot : slot + 1, :, : start + n].to(q.dtype),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )[0]
        return o

    def head_description(self) -> str:
        """How the lm_head matmul runs, for the model card and the start-up log."""
        if self.head_int8 is not None:
            return "int8 g32"
        dtype = self.lm_head.weight.dtype if self.head_weight is None else self.head_weight.dtype
        return str(dtype).removeprefix("torch.") + (" (oneDNN layout)" if self.head_onednn else "")

    def _c_prefill(self, ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """Prompt chunks through the one-call C step: each real token is a row of its slot at
        its position (the step writes every row's K/V before any row attends, so a token sees
        those before it), without the padding; the logits [B, V] of each row's last token."""
        assert self.cpu_decode is not None
        flat = torch.cat([ids[b, :n] for b, (_, _, n) in enumerate(spans)])
        slots = torch.tensor([s for s, _, n in spans for _ in range(n)])
        pos = torch.tensor([start + i for _, start, n in spans for i in range(n)])
        h = self.embed(flat)
        self.cpu_decode(h, slots, pos)
        ends = torch.tensor([n for _, _, n in spans]).cumsum(0) - 1
        return self._head(self.norm(h[ends]))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_int8 is not None:
            return self.head_int8(x)
        if self.head_weight is None:
            return self.lm_head(x)
        x = x.to(self.head_weight.dtype)
        if self.head_onednn:
            return onednn_linear(x, self.head_weight, self.head_bias)
        bias = None if self.head_bias is None else self.head_bias.to(x.dtype)
        return F.linear(x, self.head_weight, bias)

    def _fused_step(
        self, ids: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """`_step` for one token per row (ids, slots, pos: [B]) through the fused decode
        kernels: per layer a residual add + norm after each block, rotary + cache write, and
        attention that reads each row's slot up to its own position."""
        from bitserve.kernels import triton_decode as fused

        h = self.embed(ids)
        x = torch.empty_like(h)
        norms = [layer.attn_norm for layer in self.layers] + [self.norm]
        fused.add_rms_norm(h, None, norms[0].weight, norms[0].variance_epsilon, x)
        for i, layer in enumerate(self.layers):
            qkv = _project(layer.qkv, x)
            k, v = self.k_cache[i], self.v_cache[i]
            q = fused.rope_to_cache(qkv, self.cos, self.signed_sin, pos, slots, k, v, self.heads)
            o = fused.decode_attention(q, k, v, slots, pos, kv_len, self.scale)
            mlp_norm = layer.mlp_norm
            fused.add_rms_norm(h, layer.o(o), mlp_norm.weight, mlp_norm.variance_epsilon, x)
            gate_up = _project(layer.gate_up, x)
            if self.silu:
                a = fused.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                a = layer.act(gate) * up
            nxt = norms[i + 1]
            fused.add_rms_norm(h, layer.down(a), nxt.weight, nxt.variance_epsilon, x)
        return self._head(x)
