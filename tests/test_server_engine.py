"""The engine's parts without HTTP: the lean llama runner against the HF forward, incremental
detokenization, and per-request sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bitserve.kernels.quant_linear import QuantLinear
from bitserve.models import load_model
from bitserve.server.engine import Detokenizer
from bitserve.server.runner import LlamaRunner
from bitserve.server.sampling import SamplingParams, make_generator, sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_runner_matches_hf_forward(server_tiny_checkpoint: Path) -> None:
    model = load_model(server_tiny_checkpoint).model  # the HF forward, the reference
    runner = LlamaRunner(load_model(server_tiny_checkpoint).model, num_slots=3, max_len=64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (7, 12, 3)]
    for slot, ids in enumerate(seqs):  # chunked prefill, 5 tokens at a time
        for start in range(0, len(ids), 5):
            chunk = ids[start : start + 5]
            logits = runner.forward(
                torch.tensor([chunk]), torch.tensor([slot]), torch.tensor([start])
            )
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1]
        assert rel_err(logits[0], ref) < 1e-4
    for _ in range(4):  # batched decode over slots of different lengths
        nxt = [int(torch.randint(0, 1000, (1,), generator=g)) for _ in seqs]
        logits = runner.forward(
            torch.tensor([[t] for t in nxt]),
            torch.tensor([0, 1, 2]),
            torch.tensor([len(s) for s in seqs]),
        )
        for i, t in enumerate(nxt):
            seqs[i].append(t)
            with torch.no_grad():
                ref = model(torch.tensor([seqs[i]])).logits[0, -1]
            # 1e-4 plus a little: a different op order flips some int16 roundings of the
            # activations in our CPU kernel (about 3e-5 each), and layers carry them on
            assert rel_err(logits[i], ref) < 2e-4


def test_detokenizer_never_splits_a_character(server_tiny_checkpoint: Path) -> None:
    tok = load_model(server_tiny_checkpoint).tokenizer
    text = "Héllo wörld, 世界 says 🎉🦀 naïve café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok, stop=[])
    deltas = []
    for t in ids:
        detok.add(t)
        deltas.append(detok.take(final=False))
    deltas.append(detok.take(final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert "" in deltas[:-1]  # some token ended inside a multi-byte character and was held back


def test_detokenizer_matches_a_full_decode(server_tiny_checkpoint: Path) -> None:
    """Decoding only a window per token gives, at every step, a prefix of the whole
    sequence's decode and in the end exactly it: WikiText-style spacing (" , " and " @-@ "),
    code, several scripts, and special tokens (skipped) in the middle."""
    tok = load_model(server_tiny_checkpoint).tokenizer
    texts = [
        "The game 's development began in 2010 , carrying over a large portion @-@ of the work .",
        "def f(x):\n    return {'a': x ** 2}  # ok?\n\n\tprint( f ( 3 ) )",
        "Ελληνικά, русский, 日本語のテキスト — and ümlauts; emoji 👩‍💻 at the end",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[:5] + [tok.eos_token_id] + ids[5:]  # a skipped special token mid-stream
        detok = Detokenizer(tok, stop=[])
        for i, t in enumerate(ids):
            detok.add(t)
            assert tok.decode(ids[: i + 1], skip_special_tokens=True).startswith(detok.text)
        assert detok.text == tok.decode(ids, skip_special_tokens=True)


def test_detokenizer_keeps_sentencepiece_spaces() -> None:
    """With a sentencepiece-style decoder ('▁' marks a space, dropped at the start of a decode)
    a token decoded alone loses its space; the window's context tokens keep it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁the", "▁cat", "▁sat", "▁on", "▁a", "▁mat", ",", "▁again"]
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    ids = [vocab[w] for w in ["▁the", "▁cat", "▁sat", ",", "▁again", "▁on", "▁a", "▁mat"]]
    detok = Detokenizer(tok, stop=[])
    for t in ids:
        detok.add(t)
    assert detok.text == tok.decode(ids) == "the cat sat, again on a mat"


def test_detokenizer_stop_string_is_held_back_and_cut(server_tiny_checkpoint: Path) -> None:
    tok = load_model(server_tiny_checkpoint).tokenizer
    ids = tok("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok, stop=["STOP", "zzz"])
    sent, hit = "", False
    for t in ids:
        hit = detok.add(t)
        sent += detok.take(final=hit)
        if hit:
            break
    assert hit and sent == "alpha beta "


def test_sampling_rules() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=g)
    greedy = SamplingParams(max_tokens=1, temperature=0)
    topk1 = SamplingParams(max_tokens=1, temperature=1.5, top_k=1)
    tiny_p = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6)
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=3, logprobs=2)
    params = [greedy, topk1, tiny_p, seeded]
    gens = [make_generator(p.seed) for p in params]
    tokens, lps = sample(logits, params, gens, [None] * 4)
    argmax = logits.argmax(-1).tolist()
    assert tokens[:3] == argmax[:3]
    # the seeded row draws the same token alone as in the batch
    alone, _ = sample(logits[3:], [seeded], [make_generator(3)], [None])
    assert alone[0] == tokens[3]
    lp = lps[3]
    assert lp is not None and len(lp.top) == 2
    assert lp.logprob == pytest.approx(float(torch.log_softmax(logits[3], -1)[tokens[3]]))
    # a frequency penalty on the argmax token moves greedy elsewhere
    counts = torch.zeros(100)
    counts[argmax[0]] = 1
    pen = SamplingParams(max_tokens=1, temperature=0, frequency_penalty=2.0)
    moved, _ = sample(logits[:1] * 0.1, [pen], [make_generator(None)], [counts])
    assert moved[0] != argmax[0]


def test_greedy_sampling_syncs_with_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy batch (a penalized row included) reads the device once: one `tolist` of the
    argmax and validity flags, no scalar reads (`bool(t)`, `float(t)`: a GPU sync each), and no
    copy of the logits; a row that draws copies only itself to the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            self.seen.append((str(func), tuple(out.shape) if torch.is_tensor(out) else ()))
            return out

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    counts = torch.zeros(300)
    counts[int(logits[1].argmax())] = 3
    greedy = SamplingParams(max_tokens=1, temperature=0)
    pen = SamplingParams(max_tokens=1, temperature=0, frequency_penalty=5.0)
    params = [greedy, pen, greedy, greedy]
    with Ops() as ops:
        tokens, _ = sample(logits, params, [make_generator(1)] * 4, [None, counts, None, None])
    assert reads == [torch.Size([2, 4])]
    assert not [op for op, _ in ops.seen if "_local_scalar_dense" in op]
    assert not [op for op, _ in ops.seen if op.startswith("aten.index")]
    assert tokens[1] != int(logits[1].argmax()) and tokens[2] == int(logits[2].argmax())
    hot = SamplingParams(max_tokens=1, temperature=1.0, top_k=3)
    with Ops() as ops:
        sample(logits, [greedy, hot, greedy, greedy], [make_generator(1)] * 4, [None] * 4)
    assert [s for op, s in ops.seen if op.startswith("aten.index")] == [(1, 300)]


def test_logprobs_of_rows_asking_for_different_counts() -> None:
    """Rows asking for 0, 2 and 5 alternatives (and one for none) each get their own: the
    chosen token's log-probability under the raw logits (before penalties) and their top n."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    counts = torch.zeros(50)
    counts[int(logits[2].argmax())] = 1
    params = [
        SamplingParams(max_tokens=1, temperature=0, logprobs=0),
        SamplingParams(max_tokens=1, temperature=0, logprobs=2),
        SamplingParams(max_tokens=1, temperature=0, logprobs=5, frequency_penalty=50.0),
        SamplingParams(max_tokens=1, temperature=0),
    ]
    tokens, info = sample(logits, params, [make_generator(1)] * 4, [None, None, counts, None])
    raw = torch.log_softmax(logits, dim=-1)
    assert tokens[2] != int(logits[2].argmax())  # the penalty moved it
    for i, n in enumerate([0, 2, 5]):
        got = info[i]
        assert got is not None and got.logprob == pytest.approx(float(raw[i, tokens[i]]))
        values, ids = raw[i].topk(n)
        assert [t for t, _ in got.top] == ids.tolist()
        assert [v for _, v in got.top] == pytest.approx(values.tolist())
    assert info[3] is None


def test_int8_head_matches_fp32_and_is_batch_invariant() -> None:
    """head_dtype int8: the lm_head runs as a W8 g32 QuantLinear on the cpu backend for every
    step (no bf16 copy kept), its logits close to the fp32 head's; a row's logits do not depend
    on how many rows share the step (so concurrent greedy requests equal sequential ones)."""
    import copy

    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(9)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    fp32 = LlamaRunner(copy.deepcopy(model), num_slots=8, max_len=16)
    int8 = LlamaRunner(model, num_slots=8, max_len=16, head_dtype=torch.int8)
    assert int8.head_int8 is not None and int8.head_int8.backend == "cpu"
    assert int8.head_weight is None and int8.head_description() == "int8 g32"
    ids = torch.randint(0, 100, (8, 3), generator=torch.Generator().manual_seed(1))
    slots, starts = torch.arange(8), torch.zeros(8, dtype=torch.long)
    got = int8.forward(ids, slots, starts)
    assert rel_err(got, fp32.forward(ids, slots, starts)) < 1e-2
    alone = int8.forward(ids[2:3], slots[2:3], starts[2:3])
    assert torch.equal(alone[0], got[2])


def test_auto_head_is_int8_only_where_our_kernel_runs_and_onednn_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--head-dtype auto`: int8 on a CPU with our kernel, a head shape it takes and no oneDNN
    bf16 matmul (plain AVX2); bf16 with oneDNN, without our kernel, for a vocabulary that is not
    whole column blocks, or off the CPU."""
    import types

    import bitserve.server.runner as runner_module
    from bitserve.kernels import cpu_native
    from bitserve.server.runner import auto_head_dtype

    lib = types.SimpleNamespace(cols=16)  # stands for a built kernel
    head, odd, meta = torch.zeros(64, 96), torch.zeros(50, 96), torch.zeros(64, 96, device="meta")
    for have_lib, have_onednn, weight, want in [
        (True, False, head, torch.int8),
        (True, True, head, torch.bfloat16),
        (False, False, head, torch.bfloat16),
        (True, False, odd, torch.bfloat16),
        (True, False, meta, torch.bfloat16),
    ]:
        monkeypatch.setattr(cpu_native, "library", lambda h=have_lib: lib if h else None)
        monkeypatch.setattr(
            runner_module, "onednn_weight", lambda w, o=have_onednn: w if o else None
        )
        got = auto_head_dtype(weight)
        assert got == want, (have_lib, have_onednn, tuple(weight.shape), weight.device)


def _onednn_bf16() -> bool:
    """Whether oneDNN's bf16 matmul runs on this CPU (it needs AVX512 or AVX-NE-CONVERT)."""
    from bitserve.server.runner import onednn_weight

    return onednn_weight(torch.randn(16, 32).bfloat16()) is not None


@pytest.mark.skipif(not _onednn_bf16(), reason="no oneDNN bf16 matmul on this CPU or torch")
def test_bf16_head_in_onednn_layout_gives_f_linears_logits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On the CPU the bf16 lm_head copy is reordered into oneDNN's layout (about 2x faster): its
    logits are F.linear's on the bf16 weight, each row the same alone or among others; a torch
    whose reordered matmul fails or answers differently keeps the plain layout, and says so."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    import bitserve.server.runner as runner_module

    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    runner = LlamaRunner(model, num_slots=2, max_len=16, head_dtype=torch.bfloat16)
    assert runner.head_onednn and runner.head_description() == "bfloat16 (oneDNN layout)"
    x = torch.randn(6, model.config.hidden_size)
    want = F.linear(x.bfloat16(), model.lm_head.weight.detach().bfloat16())
    got = runner._head(x)
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), want.float()) < 1e-3
    for i in range(6):
        assert torch.equal(runner._head(x[i : i + 1])[0], got[i])

    def wrong(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(x.shape[0], packed.shape[0], dtype=x.dtype)

    def missing(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("no such op")

    real = runner_module.onednn_linear

    def by_batch(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = real(x, packed, bias)
        return y if x.shape[0] > 1 else y * (1 + 2**-7)  # one row rounded otherwise

    runners = []
    with caplog.at_level("INFO", logger="bitserve.runner"):
        for fake in (wrong, missing, by_batch):
            monkeypatch.setattr(runner_module, "onednn_linear", fake)
            runners.append(LlamaRunner(model, num_slots=2, max_len=16, head_dtype=torch.bfloat16))
    assert "differs from F.linear" in caplog.text and "no such op" in caplog.text
    assert "rounds rows by batch" in caplog.text
    for r in runners:
        assert not r.head_onednn and r.head_description() == "bfloat16"
        assert torch.equal(r._head(x), want)


def test_int8_head_off_the_cpu_warns_and_keeps_the_models_head(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The int8 head is the cpu backend's: a model elsewhere (here on the meta device, standing
    in for a GPU) keeps its own head, and the log says why."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval().to("meta")
    with caplog.at_level("WARNING", logger="bitserve.runner"):
        runner = LlamaRunner(model, num_slots=2, max_len=16, head_dtype=torch.int8)
    assert runner.head_int8 is None and runner.head_description() == "float32"
    assert "int8 lm_head runs on the CPU only" in caplog.text


def test_runner_padded_batch_prefill_matches_hf(server_tiny_checkpoint: Path) -> None:
    model = load_model(server_tiny_checkpoint).model
    runner = LlamaRunner(load_model(server_tiny_checkpoint).model, num_slots=4, max_len=32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (9, 4, 1)]
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    logits = runner.forward(
        ids,
        torch.tensor([3, 0, 2]),
        torch.zeros(3, dtype=torch.long),
        torch.tensor([len(p) - 1 for p in prompts]),
    )
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0, -1]
        assert rel_err(logits[i], ref) < 1e-4
    # the padding left behind in slot 0 does not leak into its next decode step
    nxt = [5]
    out = runner.forward(torch.tensor([nxt]), torch.tensor([0]), torch.tensor([len(prompts[1])]))
    with torch.no_grad():
        ref = model(torch.tensor([prompts[1] + nxt])).logits[0, -1]
    assert rel_err(out[0], ref) < 1e-4


def test_runner_rows_do_not_depend_on_the_batch() -> None:
    """A sequence's logits are bit for bit the same alone and beside sequences of other
    lengths: prefill padded to a longer row (and a continuation chunk), and decode steps next
    to longer and shorter rows, in non-consecutive slots. One masked attention call over the
    batch rounded differently in the last bit, and through the default model's 30 layers the
    quantized matmuls' 16-bit casts grew that into different logits and greedy texts;
    random-init models of a few layers never showed it."""
    from conftest import DEFAULT_TOKENIZER

    from bitserve.quantization import QuantSpec, get_method
    from bitserve.quantization.pipeline import quantize_model, swap_in_quant_linears

    if not (DEFAULT_TOKENIZER / "config.json").is_file():
        pytest.skip("default model folder not fetched (run `bitserve fetch-default`)")
    model = load_model(DEFAULT_TOKENIZER).model
    with torch.no_grad():
        quantized, _ = quantize_model(
            model, get_method("rtn"), QuantSpec(4, 128), None, progress=False
        )
        swap_in_quant_linears(model, quantized)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend("cpu")
    # slots 4-6 hold the batch, 0-2 the same sequences alone; the lm_head in bf16, as `serve`
    # runs it (an fp32 head is torch.mm's, whose rows depend on the batch)
    runner = LlamaRunner(model, 7, 128, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (37, 53, 20)]

    def prefill(rows: list[int], slot0: int, start: int, n: list[int]) -> torch.Tensor:
        chunks = [prompts[r][start : start + k] for r, k in zip(rows, n, strict=True)]
        width = max(map(len, chunks))
        return runner.forward(
            torch.tensor([c + [0] * (width - len(c)) for c in chunks]),
            torch.tensor([slot0 + r for r in rows]),
            torch.full((len(rows),), start),
            torch.tensor([len(c) - 1 for c in chunks]),
        )

    # two chunks: positions 0-20, then 21-36 for row 0 (21-52 and 0-19 for the others)
    for start, n in ((0, [21, 21, 20]), (21, [16, 32, 0])):
        rows = [r for r in range(3) if n[r]]
        together = prefill(rows, 4, start, [n[r] for r in rows])
        for i, r in enumerate(rows):
            assert torch.equal(prefill([r], 0, start, [n[r]])[0], together[i]), (start, r)
    pos = torch.tensor([len(p) for p in prompts])
    for step in range(3):
        nxt = torch.randint(0, 49152, (3, 1), generator=g)
        order = [2, 0, 1]  # sequence r is row (r + 1) % 3 of the batch
        together = runner.forward(nxt[order], torch.tensor([6, 4, 5]), pos[order] + step)
        for r in range(3):
            one = runner.forward(nxt[r : r + 1], torch.tensor([r]), (pos + step)[r : r + 1])
            assert torch.equal(one[0], together[(r + 1) % 3]), (step, r)


def test_kv_cache_budget_limits_slots(server_tiny_checkpoint: Path) -> None:
    from bitserve.errors import UsageError
    from bitserve.server.cli import build_state
    from bitserve.server.runner import kv_bytes_per_slot
    from bitserve.server.settings import Settings

    loaded = load_model(server_tiny_checkpoint)
    per_slot = kv_bytes_per_slot(loaded.model.config, 128, torch.float32)
    budget = 3.5 * per_slot / 2**20
    fp32 = Settings(
        max_num_seqs=8, max_model_len=128, kv_cache_mib=budget, kv_cache_dtype="float32"
    )
    runner = build_state(loaded, fp32).engine.runner
    assert runner.num_slots == 3 and runner.k_cache.dtype == torch.float32
    assert runner.k_cache.numel() * 4 * 2 == 3 * per_slot
    # fp16 K/V: twice the sequences in the same budget
    fp16 = fp32.model_copy(update={"kv_cache_dtype": "float16"})
    runner = build_state(load_model(server_tiny_checkpoint), fp16).engine.runner
    assert runner.num_slots == 7 and runner.k_cache.dtype == torch.float16
    assert runner.k_cache.numel() * 2 * 2 == 7 * per_slot // 2
    with pytest.raises(UsageError, match="holds no sequence"):
        build_state(loaded, Settings(max_num_seqs=8, max_model_len=128, kv_cache_mib=budget / 8))


def test_kv_cache_narrower_than_the_model_only_for_fp32_on_the_cpu() -> None:
    """An fp16 K/V cache is for fp32 models on the CPU, and `auto` picks it where the C step
    runs; any other mix is a usage error that names the flag (on a GPU: `--device cuda
    --kv-cache-dtype float32` for an fp16 model)."""
    from bitserve.errors import UsageError
    from bitserve.quantization.grid import QuantSpec

    model = _tiny_llama(QuantSpec(4, 32))
    assert LlamaRunner(model, 2, 16, kv_dtype=torch.float16).k_cache.dtype == torch.float16
    # auto: fp16 where the C step runs (our kernel, every projection on it), else the model's
    from bitserve.kernels import cpu_native

    c_step = LlamaRunner(_tiny_llama(QuantSpec(4, 32)), 2, 16, kv_dtype="auto")
    assert (c_step.cpu_decode is not None) == (cpu_native.library() is not None)
    want = torch.float16 if c_step.cpu_decode is not None else torch.float32
    assert c_step.k_cache.dtype == c_step.v_cache.dtype == want
    dense = LlamaRunner(_tiny_llama(None), 2, 16, kv_dtype="auto")  # fp32 weights: torch's ops
    assert dense.cpu_decode is None and dense.k_cache.dtype == torch.float32
    with pytest.raises(ValueError, match="'fp8'"):
        LlamaRunner(_tiny_llama(None), 2, 16, kv_dtype="fp8")
    with pytest.raises(UsageError, match="--kv-cache-dtype bfloat16: a float32 model on cpu"):
        LlamaRunner(_tiny_llama(QuantSpec(4, 32)), 2, 16, kv_dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="--kv-cache-dtype float16: a bfloat16 model on cpu"):
        LlamaRunner(_tiny_llama(None).bfloat16(), 2, 16, kv_dtype=torch.float16)


def test_serve_cli_refuses_bad_sources_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tiny_models import save_tiny_model

    qwen = save_tiny_model(tmp_path / "qwen", arch="qwen2")
    llama = save_tiny_model(tmp_path / "llama")
    cases = [
        ([str(tmp_path / "missing")], "no such file"),
        ([str(qwen)], "not supported"),
        ([str(llama), "--device", "tpu"], "invalid choice"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(llama), "--device", "cuda"], "no CUDA GPU"))
    for args, expected in cases:
        r = subprocess.run(
            [sys.executable, "-m", "bitserve.cli", "serve", *args, "--port", "0"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        last = r.stderr.strip().splitlines()[-1]  # earlier lines: transformers' progress bars
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert last.startswith(("bitserve: error:", "bitserve serve: error:")) and expected in last


@pytest.mark.parametrize("kind", ["linear", "quant", "unfusable"])
def test_runner_fuses_projections(server_tiny_checkpoint: Path, kind: str) -> None:
    """q/k/v and gate/up become one module each (nn.Linear or QuantLinear) and the originals are
    freed; projections that cannot be fused run side by side. Either way the logits match the
    HF forward of an untouched copy."""
    import copy

    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    from bitserve.kernels import QuantLinear

    if kind == "quant":
        model = load_model(server_tiny_checkpoint).model
    else:
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    if kind == "unfusable":  # a module type the runner does not know how to concatenate
        for layer in model.model.layers:
            layer.self_attn.k_proj = torch.nn.Sequential(layer.self_attn.k_proj)
            layer.mlp.up_proj = torch.nn.Sequential(layer.mlp.up_proj)
    ref_model = copy.deepcopy(model)
    runner = LlamaRunner(model, num_slots=2, max_len=32)
    for layer in model.model.layers:
        if kind == "unfusable":
            assert hasattr(layer.self_attn, "q_proj") and not hasattr(layer.self_attn, "qkv_proj")
            continue
        fused = QuantLinear if kind == "quant" else torch.nn.Linear
        assert isinstance(layer.self_attn.qkv_proj, fused)
        assert isinstance(layer.mlp.gate_up_proj, fused)
        if kind == "quant":  # the cpu backend's repacked copy is all that is left
            for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
                assert proj.backend == "cpu" and proj.qweight.numel() == 0
        assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    logits = runner.forward(ids, torch.tensor([1, 0]), torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        ref = ref_model(ids).logits[:, -1]
    assert rel_err(logits, ref) < 1e-4


def _nucleus(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The target distribution, computed the plain way: sort everything, mask, renormalize."""
    probs, order = (logits / p.temperature).softmax(-1).sort(descending=True)
    if p.top_k:
        probs[p.top_k :] = 0
        probs = probs / probs.sum()
    before = probs.cumsum(-1) - probs
    probs[1:][before[1:] >= p.top_p] = 0
    return torch.zeros_like(probs).scatter(0, order, probs / probs.sum())


@pytest.mark.parametrize(
    "shape,params",
    [
        ("peaked", SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9)),
        ("flat", SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)),  # nucleus > 256
        ("peaked", SamplingParams(max_tokens=1, temperature=1.3, top_k=20, top_p=0.6)),
        ("peaked", SamplingParams(max_tokens=1, temperature=0.9)),
    ],
)
def test_sampling_draws_from_the_filtered_distribution(shape: str, params: SamplingParams) -> None:
    """Draws land only inside the top-k/top-p support and follow the target distribution
    (total variation over 3000 draws), whichever shortcut the sampler takes."""
    g = torch.Generator().manual_seed(7)
    scale = 4.0 if shape == "peaked" else 0.05
    logits = torch.randn(1, 5000, generator=g) * scale
    target = _nucleus(logits[0], params)
    gen = make_generator(11)
    draws = torch.tensor([sample(logits, [params], [gen], [None])[0][0] for _ in range(3000)])
    assert bool((target[draws] > 0).all())  # never outside the filtered support
    freq = torch.bincount(draws, minlength=5000).float() / len(draws)
    if shape == "flat":  # too many tokens for frequencies: check the support's size instead
        assert int((target > 0).sum()) > 256 and len(set(draws.tolist())) > 256
    else:
        assert float((freq - target).abs().sum()) / 2 < 0.06


def test_batched_draws_match_row_draws() -> None:
    """`_draw_rows` (the GPU's sampler: the batch at once, a sort of the vocabulary) picks the
    token that `_draw` (the CPU's, row by row) picks from the same uniform numbers: for every
    filter, the greedy limit of a temperature that overflows on some steps (a draw still takes
    its uniform number then), and rows with masked (-inf) tokens. Seeded generators on both
    sides, 300 batches, every row every time."""
    from bitserve.server.sampling import _draw, _draw_rows

    params = [
        SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5),
        SamplingParams(max_tokens=1, temperature=1.3, top_k=20, top_p=0.6),
        SamplingParams(max_tokens=1, temperature=0.9),
        SamplingParams(max_tokens=1, temperature=1.1, top_k=7),
        SamplingParams(max_tokens=1, temperature=1e-30, top_k=5),
        SamplingParams(max_tokens=1, temperature=0.8, top_p=0.95),
    ]
    g = torch.Generator().manual_seed(12)
    scale = torch.tensor([4.0, 0.05] * 4)[: len(params)].unsqueeze(1)  # peaked, flat, ...
    logits = torch.randn(len(params), 3000, generator=g) * scale
    logits[6, ::3] = float("-inf")  # masked tokens
    logits[5, 10] = float("-inf")
    gens_a = [make_generator(100 + i) for i in range(len(params))]
    gens_b = [make_generator(100 + i) for i in range(len(params))]
    batched, rowwise = [], []
    for t in range(300):  # row 5 overflows its temperature every other step (greedy then)
        step = logits.clone()
        step[5] *= 1e10 if t % 2 == 0 else 1e-30
        batched.append(_draw_rows(step, params, gens_a))
        rowwise.append([_draw(r, p, gen) for r, p, gen in zip(step, params, gens_b, strict=True)])
    assert batched == rowwise
    picks = torch.tensor(batched)
    assert (picks[::2, 5] == int(logits[5].argmax())).all()  # greedy limit
    assert len(set(picks[1::2, 5].tolist())) > 1  # drawn among the top 5 otherwise
    assert (picks[:, 6] % 3 != 0).all()  # never a masked token
    assert all(len(set(picks[:, i].tolist())) > 3 for i in (0, 1, 3, 4, 6))  # real draws


def test_runner_half_precision_model() -> None:
    """A 16-bit model (as served on a GPU) keeps its dtype: KV cache in bf16, no extra lm_head
    copy for a head_dtype that is not narrower, float32 logits on the CPU close to HF's."""
    import copy

    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval().to(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    runner = LlamaRunner(model, num_slots=2, max_len=32, head_dtype=torch.bfloat16)
    assert runner.k_cache.dtype == torch.bfloat16 and runner.head_weight is None
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(6))
    logits = runner.forward(ids, torch.tensor([1]), torch.tensor([0]))
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    with torch.no_grad():
        ref = ref_model(ids).logits[:, -1].float()
    assert rel_err(logits, ref) < 3e-2


def test_sampling_degenerate_inputs() -> None:
    """A temperature so small that the scaled logits overflow samples its limit (greedy);
    NaN logits are an error for the sequence, never a silent token."""
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(8))
    tiny = SamplingParams(max_tokens=1, temperature=1e-40)
    assert sample(logits, [tiny], [make_generator(1)], [None])[0] == [int(logits.argmax())]
    bad = logits.clone()
    bad[0, 3] = float("nan")
    hot = SamplingParams(max_tokens=1, temperature=1.0, top_k=5)
    with pytest.raises(ValueError, match="NaN"):
        sample(bad, [hot], [make_generator(1)], [None])


def test_a_broken_row_fails_only_its_sequence(server_tiny_checkpoint: Path) -> None:
    """NaN logits for one sequence finish it with finish_reason 'error' and clear its KV slot;
    the other sequence in the same batch decodes on and gives the tokens it gives alone."""
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    def run(prompts: list[list[int]], poison_slot: int | None) -> tuple[dict[int, list], Any]:
        engine = build_state(
            load_model(server_tiny_checkpoint), Settings(max_num_seqs=4, max_model_len=64)
        ).engine
        forward = engine.runner.forward

        def poisoned(ids, slots, starts, last=None):  # type: ignore[no-untyped-def]
            out = forward(ids, slots, starts, last).clone()  # not an inference-mode tensor
            out[slots == poison_slot] = float("nan")
            return out

        engine.runner.forward = poisoned
        outs: dict[int, list] = {i: [] for i in range(len(prompts))}
        params = SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True)
        seqs = [engine.new_sequence(i, p, params, outs[i].append) for i, p in enumerate(prompts)]
        engine.submit(seqs)
        for _ in range(20):
            engine.step()
        return outs, engine.runner

    both, runner = run([[5, 6, 7], [8, 9, 10, 11]], poison_slot=1)
    assert not runner.k_cache[:, 1].any() and runner.k_cache[:, 0].any()  # slot 1 cleared
    alone, _ = run([[5, 6, 7]], poison_slot=None)
    assert [o.finish_reason for o in both[1]] == ["error"]
    assert both[0][-1].finish_reason == "length"
    assert [t for o in both[0] for t in o.token_ids] == [t for o in alone[0] for t in o.token_ids]
    with pytest.raises(ValueError, match="NaN"):
        sample(
            torch.full((1, 10), float("nan")), [SamplingParams(1, 0)], [make_generator(1)], [None]
        )


def _run_to_end(engine: Any, prompt: list[int], max_tokens: int = 4) -> list[int]:
    """Greedy output ids of one sequence stepped to its end on `engine`."""
    outs: list[Any] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.submit([engine.new_sequence(0, prompt, params, outs.append)])
    while engine.running or engine.waiting:
        engine.step()
    assert outs[-1].finish_reason == "length"
    return [t for o in outs for t in o.token_ids]


def test_prefix_cache_gives_a_prompt_the_slot_holding_its_longest_prefix(
    server_tiny_checkpoint: Path,
) -> None:
    """With the prefix cache a finished sequence's slot keeps its K/V: a later prompt that
    starts with its prompt and output (a chat's next turn) takes that slot and prefills only
    the new tokens; the last prompt token is always prefilled; unrelated prompts, and prompts
    sharing less than half of a slot's tokens, take the slot freed longest ago (unused ones
    first); a failed sequence's slot keeps nothing. Without it, a prefix shorter than a whole
    prefill chunk is not reused."""
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    def engine(cache: bool) -> Any:
        settings = Settings(max_num_seqs=3, max_model_len=64, prefix_cache=cache)
        return build_state(load_model(server_tiny_checkpoint), settings).engine

    def counter(e: Any, name: str) -> float:
        return float(getattr(e.m, name).labels(**e.label)._value.get())

    e = engine(True)
    first = list(range(5, 15))
    out = _run_to_end(e, first)
    assert e.slot_tokens[0] == first + out[:3]  # the 4th token was never fed back
    _run_to_end(e, [20, 21, 22])  # no shared prefix: the oldest free slot, 1
    assert e.slot_tokens[1][:3] == [20, 21, 22] and e.free_slots == [2, 0, 1]
    prompted = counter(e, "prompt_tokens")
    turn = first + out[:3] + [30, 31]
    _run_to_end(e, turn)
    assert e.slot_tokens[0][: len(turn)] == turn  # slot 0 again
    assert counter(e, "prefix_hits") == 13 and counter(e, "prompt_tokens") - prompted == 2
    _run_to_end(e, turn)  # the whole prompt cached: its last token is prefilled again
    assert counter(e, "prefix_hits") == 13 + len(turn) - 1
    assert counter(e, "prefix_queries") == 10 + 3 + 2 * len(turn)
    held = list(e.slot_tokens[0])
    _run_to_end(e, first[:3] + [33] * 8)  # another chat sharing only a 3-token header
    assert e.slot_tokens[0] == held and e.slot_tokens[2][:4] == first[:3] + [33]  # unused slot

    e.runner.forward = lambda *a: torch.full((1, e.runner.lm_head.out_features), float("nan"))
    outs: list[Any] = []
    e.submit([e.new_sequence(0, turn, SamplingParams(max_tokens=4), outs.append)])
    e.step()
    assert outs[-1].finish_reason == "error" and e.slot_tokens[0] == []

    plain = engine(False)
    _run_to_end(plain, first)
    _run_to_end(plain, first + [1])
    assert counter(plain, "prefix_hits") == 0 and counter(plain, "prefix_queries") == 21
    assert counter(plain, "prompt_tokens") == 21


def test_whole_prefill_chunks_are_reused_bit_for_bit(server_tiny_checkpoint: Path) -> None:
    """Without the prefix cache, a prompt reuses the whole prefill chunks it starts with that a
    slot holds (a finished sequence's, or a running one's, copied), and its cache and tokens
    are then those of its prefill on a fresh engine, bit for bit. Positions filled by decode
    steps, or past the last whole chunk, are not reused; the prefix cache reuses them. A copy
    that fails answers its sequence with an error and leaves the slot free. (This
    tiny model rounds a prompt split anywhere as it rounds it whole; the default model does
    not through torch's ops, and test_default_model.py checks that reuse there.)"""
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    pre = list(range(5, 25))
    first, second = pre + [30, 31], pre + [40, 41, 42]

    def engine(cache: bool = False) -> Any:
        settings = Settings(max_num_seqs=3, max_model_len=64, prefill_chunk=8, prefix_cache=cache)
        return build_state(load_model(server_tiny_checkpoint), settings).engine

    def run(e: Any, prompt: list[int], keep_running: Any = None) -> tuple[list[int], Any, float]:
        """Seeded sampled tokens of `prompt` on e, its slot's keys and its cached count."""
        outs: list[Any] = []
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
        seq = e.new_sequence(0, prompt, params, outs.append)
        e.submit([seq])
        while seq in e.running or seq in e.waiting:
            e.step()
        keys = e.runner.k_cache[:, seq.slot, :, : len(prompt) + 5].clone()
        return [t for o in outs for t in o.token_ids], keys, seq.cached

    alone = run(engine(), second)
    e = engine()
    run(e, first)
    after = run(e, second)
    assert after[2] == 16 and after[0] == alone[0] and torch.equal(after[1], alone[1])

    e = engine()  # the first still decoding when the second arrives: copied from its slot
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    e.submit([e.new_sequence(1, first, params, lambda o: None)])
    for _ in range(4):
        e.step()
    copied = run(e, second)
    assert copied[2] == 16 and copied[0] == alone[0] and torch.equal(copied[1], alone[1])

    e = engine()  # two choices over a reused chunk: the second copies it, they share the rest
    run(e, first)
    prompted = e.m.prompt_tokens.labels(**e.label)._value.get()
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    e.submit([e.new_sequence(i, second, params, lambda o: None) for i in range(2)])
    while e.running or e.waiting:
        e.step()
    assert e.m.prompt_tokens.labels(**e.label)._value.get() - prompted == len(second) - 16
    assert e.m.shared_prompt_tokens.labels(**e.label)._value.get() == len(second) - 16

    e = engine()  # a copy that fails answers its sequence with an error and keeps the slot free
    run(e, first)
    e.runner.copy_positions = lambda *a: (_ for _ in ()).throw(RuntimeError("copy failed"))
    outs: list[Any] = []
    forked = pre[:8] + [50] * 10  # one of slot 0's two chunks: copied into the oldest slot
    e.submit([e.new_sequence(0, forked, SamplingParams(max_tokens=2), outs.append)])
    with pytest.raises(RuntimeError, match="copy failed"):
        e.step()
    assert outs[-1].finish_reason == "error" and sorted(e.free_slots) == [0, 1, 2]
    assert not e.running and not e.waiting

    e = engine()  # what decode steps filled is not reused without the prefix cache
    tokens, _, _ = run(e, pre[:6])
    assert run(e, pre[:6] + tokens[:5] + [50])[2] == 0

    e = engine(cache=True)
    run(e, first)
    assert run(e, second)[2] == 20


def test_prefix_cache_copies_a_prefix_that_another_slot_holds(
    server_tiny_checkpoint: Path,
) -> None:
    """With the prefix cache, a prompt that shares a prefix with a running sequence gets that
    prefix's K/V copied into its own slot and prefills only the rest; it then decodes what it
    decodes when it reuses the same prefix left in its own slot."""
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    settings = Settings(max_num_seqs=3, max_model_len=64, prefix_cache=True)
    preamble = list(range(5, 25))
    first, second = preamble + [30, 31, 32, 33], preamble + [40, 41]

    e = build_state(load_model(server_tiny_checkpoint), settings).engine
    outs: list[Any] = []
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    e.submit([e.new_sequence(0, first, greedy, lambda o: None)])
    e.step()  # the first prompt prefilled; it decodes from now on
    hits = e.m.prefix_hits.labels(**e.label)._value.get()
    prompted = e.m.prompt_tokens.labels(**e.label)._value.get()
    e.submit([e.new_sequence(1, second, greedy, outs.append)])
    e.step()
    (a, b) = sorted(e.running, key=lambda q: q.index)
    assert a.slot != b.slot and a.output_ids  # a still runs, in its own slot
    assert e.m.prefix_hits.labels(**e.label)._value.get() - hits == len(preamble)
    assert e.m.prompt_tokens.labels(**e.label)._value.get() - prompted == 2
    k = e.runner.k_cache
    assert torch.equal(k[:, b.slot, :, : len(preamble)], k[:, a.slot, :, : len(preamble)])
    while e.running:
        e.step()
    copied = [t for o in outs for t in o.token_ids]

    same_slot = build_state(load_model(server_tiny_checkpoint), settings).engine
    _run_to_end(same_slot, first, max_tokens=8)
    assert _run_to_end(same_slot, second, max_tokens=8) == copied
    assert same_slot.free_slots[-1] == 0  # it did reuse slot 0


def test_prompts_share_a_chunk_only_over_the_same_cached_values(
    server_tiny_checkpoint: Path,
) -> None:
    """With the prefix cache, two slots may say they hold the same prompt tokens while their
    K/V differ (computed in other splits, here random): sequences taking them do not share
    their next chunk, each prefills over its own cache and gets what it gets alone. Choices
    whose cached prefix was copied from one sequence do share it."""
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    settings = Settings(max_num_seqs=4, max_model_len=64, prefill_chunk=8, prefix_cache=True)
    prompt = list(range(5, 25))

    def run(held: list[int], n: int) -> tuple[list[list[int]], float, list[torch.Tensor]]:
        engine = build_state(load_model(server_tiny_checkpoint), settings).engine
        g = torch.Generator().manual_seed(0)
        for cache in (engine.runner.k_cache, engine.runner.v_cache):
            part = cache[:, :2, :, :8]
            part.copy_(torch.randn(part.shape, generator=g))  # slots 0 and 1 differ
        for slot in held:
            engine.slot_tokens[slot] = prompt[:8]
        outs: dict[int, list[Any]] = {i: [] for i in range(n)}
        greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        seqs = [engine.new_sequence(i, prompt, greedy, outs[i].append) for i in range(n)]
        engine.submit(seqs)
        while engine.running or engine.waiting:
            engine.step()
        tokens = [[t for o in outs[i] for t in o.token_ids] for i in range(n)]
        computed = engine.m.prompt_tokens.labels(**engine.label)._value.get()
        keys = [engine.runner.k_cache[:, s.slot, :, : len(prompt)].clone() for s in seqs]
        return tokens, computed, keys

    tokens, computed, keys = run([0, 1], 2)  # the first takes slot 0, the second slot 1
    first, _, first_keys = run([0], 1)
    second, _, second_keys = run([1], 1)
    assert computed == 2 * (len(prompt) - 8) and tokens == first + second
    assert torch.equal(keys[0], first_keys[0]) and torch.equal(keys[1], second_keys[0])
    assert not torch.equal(keys[0][..., 8:, :], keys[1][..., 8:, :])

    tokens, computed, keys = run([0], 3)  # the others copy slot 0's prefix from the first
    assert computed == len(prompt) - 8 and tokens == first * 3
    assert all(torch.equal(k, first_keys[0]) for k in keys)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_prefix_cache_slots_hold_what_they_say_through_aborts_and_cut_offs(
    prefix_cache: bool,
) -> None:
    """Random traffic through an engine with and without the prefix cache (shared prefixes,
    1-token prompts, n = 2, aborts mid-prefill and mid-decode, length cut-offs at a 48-token
    context, prefill chunks of 8): after every step, each free slot's keys are those of a fresh
    prefill of the tokens it says it holds, and those it says lead as whole chunks are those
    of a fresh prefill in whole chunks, bit for bit."""
    import random

    from tiny_models import char_tokenizer

    from bitserve.server.engine import Engine
    from bitserve.server.metrics import create_metrics

    model = _tiny_llama(None)
    runner, fresh = LlamaRunner(model, num_slots=3, max_len=48), LlamaRunner(model, 1, 48)
    engine = Engine(runner, char_tokenizer(), create_metrics("m"), "m", set(), 8, 64, prefix_cache)
    rng = random.Random(0)
    base = [rng.randrange(5, 40) for _ in range(40)]
    live: list[Any] = []
    checked = exacts = 0
    for _ in range(150):
        if rng.random() < 0.5 and len(engine.waiting) < 4:
            n = rng.randrange(1, 40)
            prompt = (base[: rng.randrange(0, n + 1)] + [rng.randrange(5, 40)] * n)[:46]
            most = rng.randrange(1, 48 - len(prompt))
            params = SamplingParams(max_tokens=most, temperature=0, ignore_eos=True)
            seqs = [engine.new_sequence(j, prompt, params, lambda o: None) for j in range(2)]
            engine.submit(seqs[: rng.choice([1, 1, 2])])
            live += seqs
        if rng.random() < 0.15 and live:
            engine.abort([rng.choice(live)])
        engine.step()
        for slot in engine.free_slots:
            held = engine.slot_tokens[slot]
            if len(held) > 1:
                fresh.forward(torch.tensor([held]), torch.tensor([0]), torch.tensor([0]))
                keys = fresh.k_cache[:, 0, :, : len(held)]
                assert rel_err(runner.k_cache[:, slot, :, : len(held)], keys) < 1e-4
                checked += 1
            exact = engine.slot_exact[slot]
            assert exact % 8 == 0 and exact <= len(held)
            for start in range(0, exact, 8):
                chunk = torch.tensor([held[start : start + 8]])
                fresh.forward(chunk, torch.tensor([0]), torch.tensor([start]))
            assert torch.equal(runner.k_cache[:, slot, :, :exact], fresh.k_cache[:, 0, :, :exact])
            exacts += exact > 0
    engine.cut_off()
    engine.step()
    assert not engine.running and checked > 20 and exacts > (1 if prefix_cache else 10)
    assert engine.m.prefix_hits.labels(model="m")._value.get() > 20


def test_a_prompt_prefilled_after_a_cached_prefix_gives_close_logits(
    server_tiny_checkpoint: Path,
) -> None:
    """What the prefix cache relies on: a prompt prefilled in two parts (the first already in
    the slot) gives the logits of the whole prompt prefilled at once, up to rounding."""
    runner = LlamaRunner(load_model(server_tiny_checkpoint).model, num_slots=2, max_len=64)
    ids = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(4))
    whole = runner.forward(ids, torch.tensor([0]), torch.tensor([0]))
    for split in (1, 12, 29):
        runner.forward(ids[:, :split], torch.tensor([1]), torch.tensor([0]))
        parts = runner.forward(ids[:, split:], torch.tensor([1]), torch.tensor([split]))
        assert rel_err(parts, whole) < 2e-2, split
        assert parts.argmax() == whole.argmax()


def _tiny_llama(
    spec: Any, arch: str = "llama", head_dim: int | None = None, kv_heads: int | None = None
) -> Any:
    """A random 2-layer model of tiny_config (hidden 96, MLP 160; 4 query heads of 24 values, or
    `head_dim`, and 2 KV heads, or `kv_heads`), quantized in memory with RTN at `spec` (None:
    left in fp32), its QuantLinears on the cpu backend."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    from bitserve.quantization import get_method
    from bitserve.quantization.pipeline import quantize_model, swap_in_quant_linears

    torch.manual_seed(0)
    config = tiny_config(arch)
    if head_dim:
        config.head_dim = head_dim
    if kv_heads:
        config.num_key_value_heads = kv_heads
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norm weights are ones at init: they would hide a misplaced weight
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    if spec is not None:
        with torch.no_grad():
            quantized, _ = quantize_model(model, get_method("rtn"), spec, None, progress=False)
        swap_in_quant_linears(model, quantized)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.set_backend("cpu")
    return model


@pytest.mark.parametrize(
    "spec, direct, native",
    [
        ((4, 32), torch.float32, True),  # our own kernel on fp32 rows
        ((4, 64), torch.float32, True),  # K = 96: a short last group
        ((4, 32), torch.bfloat16, False),  # one torch int4 kernel call per projection
        ((4, 64), torch.bfloat16, False),  # K = 96 padded to the group: through _matmul_int4
        ((8, 32), torch.float32, True),  # our own kernel, 8-bit codes
        ((8, -1), torch.float32, True),  # our own kernel, 8-bit per channel
        ((8, 32), torch.bfloat16, False),  # two nibble planes
        ((8, -1), None, False),  # int8 per channel: the module itself
        (None, None, False),  # fp32 nn.Linear
    ],
)
def test_cpu_decode_step_gives_the_generic_steps_logits_bit_for_bit(
    spec: tuple[int, int] | None,
    direct: torch.dtype | None,
    native: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU one-token step (`_cpu_step`: projections called directly, norms and activations
    rounded straight into the matmul's dtype) computes exactly what the generic step does:
    equal logits and equal KV caches, step after step, rows in any order and length."""
    import copy

    from bitserve.kernels import cpu_native
    from bitserve.quantization.grid import QuantSpec

    if native and cpu_native.library() is None:
        pytest.skip("our CPU kernel does not build here")
    if not native:
        monkeypatch.setattr(cpu_native, "library", lambda: None)  # torch's int4 kernel

    model = _tiny_llama(None if spec is None else QuantSpec(*spec))
    fast = LlamaRunner(copy.deepcopy(model), num_slots=3, max_len=64)
    generic = LlamaRunner(model, num_slots=3, max_len=64)
    assert fast.cpu_rows is not None and fast.cpu_rows[0].qkv[0] == direct
    assert (fast.cpu_decode is not None) == native  # our kernel everywhere: the C step
    generic.cpu_rows = fast.cpu_decode = generic.cpu_decode = None
    g = torch.Generator().manual_seed(1)
    lens = [9, 3, 20]
    for r in (fast, generic):
        for slot, n in enumerate(lens):
            ids = torch.randint(0, 40, (1, n), generator=torch.Generator().manual_seed(slot))
            r.forward(ids, torch.tensor([slot]), torch.tensor([0]))
    for step in range(4):
        slots = [2, 0, 1] if step % 2 else [1]
        ids = torch.randint(0, 40, (len(slots), 1), generator=g)
        starts = torch.tensor([lens[s] for s in slots])
        a = fast.forward(ids, torch.tensor(slots), starts)
        b = generic.forward(ids, torch.tensor(slots), starts)
        assert torch.isfinite(a).all() and a.std() > 0
        assert torch.equal(a, b), (step, (a - b).abs().max())
        for s in slots:
            lens[s] += 1
    assert torch.equal(fast.k_cache, generic.k_cache)
    assert torch.equal(fast.v_cache, generic.v_cache)


class _counted:
    """A callable that counts its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.count = fn, 0

    def __call__(self, *args: Any) -> Any:
        self.count += 1
        return self.fn(*args)


def _decode_steps(
    runner: LlamaRunner, lens: list[int], steps: list[list[int]], seed: int = 1
) -> list[torch.Tensor]:
    """Prefill slot s with lens[s] tokens, then decode one token per step for the slots listed,
    in that row order: the logits of each step."""
    for slot, n in enumerate(lens):
        ids = torch.randint(0, 40, (1, n), generator=torch.Generator().manual_seed(slot))
        runner.forward(ids, torch.tensor([slot]), torch.tensor([0]))
    g, lens, out = torch.Generator().manual_seed(seed), list(lens), []
    for slots in steps:
        ids = torch.randint(0, 40, (len(slots), 1), generator=g)
        out.append(runner.forward(ids, torch.tensor(slots), torch.tensor([lens[s] for s in slots])))
        for s in slots:
            lens[s] += 1
    return out


@pytest.mark.parametrize("spec", [(4, 32), (4, 64), (8, 32), (8, -1)])
@pytest.mark.parametrize(("arch", "head_dim"), [("llama", None), ("qwen2", None), ("llama", 72)])
def test_cpu_c_decode_step_matches_the_torch_step(
    spec: tuple[int, int], arch: str, head_dim: int | None
) -> None:
    """The one-C-call decode step (`cpu_native.decoder`) against `_cpu_step` (the same kernel
    called from torch ops): close logits and KV caches (a misplaced head or position would be
    off by 1e-2 or more), step after step, rows in any order and
    length; q/k/v biases (qwen2-style, run as llama) included, and heads of 72 values (the
    attention's 64-value blocks and what is left)."""
    import copy

    from bitserve.kernels import cpu_native
    from bitserve.quantization.grid import QuantSpec

    if cpu_native.library() is None:
        pytest.skip("our CPU kernel does not build here")
    model = _tiny_llama(QuantSpec(*spec), arch, head_dim)
    model.config.model_type = "llama"  # a llama with biased q/k/v
    fast = LlamaRunner(copy.deepcopy(model), num_slots=3, max_len=64)
    torch_ops = LlamaRunner(model, num_slots=3, max_len=64)
    assert fast.cpu_decode is not None
    fast.cpu_decode = calls = _counted(fast.cpu_decode)
    torch_ops.cpu_decode = None
    steps = [[1], [2, 0, 1], [0], [2, 1, 0], [1, 2]]
    for a, b in zip(*(_decode_steps(r, [9, 3, 20], steps) for r in (fast, torch_ops)), strict=True):
        assert torch.isfinite(a).all() and a.std() > 0
        assert rel_err(a, b) < 1e-4  # the sums' order differs: int16 activations round apart
    for c in ("k_cache", "v_cache"):
        ours, theirs = getattr(fast, c), getattr(torch_ops, c)
        assert theirs.abs().sum() > 0 and rel_err(ours, theirs) < 1e-4
    assert calls.count == 3 + len(steps)  # every prefill and decode step ran in C


def test_cpu_c_prefill_of_padded_rows_matches_torch_and_each_row_alone() -> None:
    """A right-padded prefill batch (rows of 5, 12 and 3 tokens, one resuming at position 4)
    runs in one C call without its padding: logits and K/V within 1e-4 of the torch ops' path,
    and each row's K/V the same bit for bit as its prefill alone and as its prefill in two
    chunks; from `native_dense_rows()` tokens, torch's ops take the batch."""
    import copy

    from bitserve.kernels import cpu_native
    from bitserve.quantization.grid import QuantSpec

    if cpu_native.library() is None:
        pytest.skip("our CPU kernel does not build here")
    model = _tiny_llama(QuantSpec(4, 32))
    fast = LlamaRunner(copy.deepcopy(model), num_slots=6, max_len=64)
    torch_ops = LlamaRunner(model, num_slots=6, max_len=64)
    fast.cpu_decode = calls = _counted(fast.cpu_decode)
    torch_ops.cpu_decode = None
    g = torch.Generator().manual_seed(5)
    head = torch.randint(0, 40, (1, 4), generator=g)  # slot 2 resumes after 4 tokens
    for r in (fast, torch_ops):
        r.forward(head, torch.tensor([2]), torch.tensor([0]))
        r.forward(head, torch.tensor([5]), torch.tensor([0]))
    ids = torch.randint(0, 40, (3, 12), generator=g)
    lens, starts = torch.tensor([5, 12, 3]), torch.tensor([0, 0, 4])
    args = (ids, torch.tensor([0, 1, 2]), starts, lens - 1)
    ours, theirs = fast.forward(*args), torch_ops.forward(*args)
    assert torch.isfinite(ours).all() and rel_err(ours, theirs) < 1e-4
    for c in ("k_cache", "v_cache"):  # [layer, slot, head, position, value]; padding: torch's
        for slot, end in enumerate((starts + lens).tolist()):
            a, b = getattr(fast, c)[:, slot, :, :end], getattr(torch_ops, c)[:, slot, :, :end]
            assert b.abs().sum() > 0 and rel_err(a, b) < 1e-4
    for r in range(3):  # each row again alone, into slots 3-5: the same K/V bit for bit
        fast.forward(ids[r : r + 1, : lens[r]], torch.tensor([3 + r]), starts[r : r + 1])
        end = int(starts[r] + lens[r])
        for c in (fast.k_cache, fast.v_cache):
            assert torch.equal(c[:, 3 + r, :, :end], c[:, r, :, :end]), r
    assert calls.count == 2 + 1 + 3  # the prefills of slots 2 and 5, the batch, the rows alone
    # row 1 split into chunks of 5 and 7: the same K/V bit for bit (they depend on the tokens)
    fast.forward(ids[1:2, :5], torch.tensor([3]), torch.tensor([0]))
    fast.forward(ids[1:2, 5:], torch.tensor([3]), torch.tensor([5]))
    for c in (fast.k_cache, fast.v_cache):
        assert torch.equal(c[:, 3, :, :12], c[:, 1, :, :12])
    # from cpu.native_dense_rows() tokens a prefill keeps torch's ops (and its dense GEMM)
    from bitserve.kernels import cpu

    count = calls.count
    cpu.DENSE_ROWS, cpu.FP32_DENSE_ROWS, saved = 8, 8, (cpu.DENSE_ROWS, cpu.FP32_DENSE_ROWS)
    try:
        fast.forward(*args)
    finally:
        cpu.DENSE_ROWS, cpu.FP32_DENSE_ROWS = saved
    assert calls.count == count


@pytest.mark.parametrize(
    ("kv_heads", "head_dim", "kv_dtype"),
    [
        (1, None, torch.float32),
        (2, 72, torch.float32),
        (4, None, torch.float32),
        (2, 72, torch.float16),
        (4, None, torch.float16),
    ],
)
def test_cpu_c_step_attention_of_long_prompts_matches_torch(
    kv_heads: int, head_dim: int | None, kv_dtype: torch.dtype
) -> None:
    """Prompts longer than one attention task's rows (16 queries) and than a block of values (32
    positions), prefilled in chunks beside other rows, one chunk reaching past 256 positions (all
    in the C step), then decode steps of three rows and of one: logits and K/V within 1e-4 of
    torch's ops, with 4, 2 and 1 query heads to a KV head (heads of 24 and of 72 values), the
    K/V cache in fp32 or fp16; the same bit for bit with one thread and with 16 (where steps
    have fewer tasks than twice the threads, one task per query head); and a prompt's K/V the
    same bit for bit in one chunk or two. An fp16 cache holds torch's rounding of the fp32 K/V."""
    import copy

    from bitserve.kernels import cpu_native
    from bitserve.quantization.grid import QuantSpec

    if cpu_native.library() is None:
        pytest.skip("our CPU kernel does not build here")
    model = _tiny_llama(QuantSpec(4, 32), head_dim=head_dim, kv_heads=kv_heads)
    ids = torch.randint(0, 40, (3, 300), generator=torch.Generator().manual_seed(3))
    first = (ids[:2, :140], torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([139, 40]))
    rest = torch.zeros(3, 160, dtype=torch.long)  # slot 0: 160 more, slot 1: 30 more, slot 2: 5
    rest[0], rest[1, :30], rest[2, :5] = ids[0, 140:], ids[1, 41:71], ids[2, :5]
    second = (rest, torch.tensor([0, 1, 2]), torch.tensor([140, 41, 0]), torch.tensor([159, 29, 4]))
    steps: list[tuple[torch.Tensor, ...]] = [first, second]
    g, lens = torch.Generator().manual_seed(4), [300, 71, 5]
    for step in range(4):
        slots = [2, 0, 1] if step % 2 else [0]
        nxt = torch.randint(0, 40, (len(slots), 1), generator=g)
        steps.append((nxt, torch.tensor(slots), torch.tensor([lens[s] for s in slots])))
        for s in slots:
            lens[s] += 1
    runners, outs = [], []
    threads = torch.get_num_threads()
    for n in (1, 16, None):  # our C step on 1 and 16 threads, then torch's ops
        runner = LlamaRunner(copy.deepcopy(model), num_slots=4, max_len=320, kv_dtype=kv_dtype)
        assert runner.k_cache.dtype == runner.v_cache.dtype == kv_dtype
        calls = _counted(runner.cpu_decode) if n else None
        runner.cpu_decode = calls
        try:
            torch.set_num_threads(n or threads)
            outs.append([runner.forward(*args) for args in steps])
        finally:
            torch.set_num_threads(threads)
        assert calls is None or calls.count == len(steps)
        runners.append(runner)
    (one, many, theirs), (fast, fast16, torch_ops) = outs, runners
    for a, b, c in zip(one, many, theirs, strict=True):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all() and a.std() > 0 and rel_err(a, c) < 1e-4
    for c in ("k_cache", "v_cache"):
        assert torch.equal(getattr(fast, c), getattr(fast16, c))
        for slot, end in enumerate(lens):
            ours, ref = (getattr(r, c)[:, slot, :, :end] for r in (fast, torch_ops))
            assert ref.abs().sum() > 0 and rel_err(ours, ref) < 1e-4, (c, slot)
    fast.forward(ids[:1], torch.tensor([3]), torch.tensor([0]))  # slot 0's prompt in one chunk
    for c in (fast.k_cache, fast.v_cache):
        assert torch.equal(c[:, 3, :, :300], c[:, 0, :, :300])
    if kv_dtype == torch.float16:  # layer 0 of the first step: fp32 K/V rounded as torch does
        fp32 = LlamaRunner(copy.deepcopy(model), num_slots=4, max_len=320)
        fp32.forward(*first)
        for c in ("k_cache", "v_cache"):
            for slot, end in enumerate((140, 41)):
                wide = getattr(fp32, c)[0, slot, :, :end]
                assert torch.equal(getattr(fast, c)[0, slot, :, :end], wide.half())
                assert not torch.equal(wide.half().float(), wide)  # some values did round


def test_cpu_c_decode_step_rows_do_not_depend_on_the_batch_or_threads() -> None:
    """A row's logits are bit for bit the same alone or beside other rows, and with one thread
    or two."""
    from bitserve.kernels import cpu_native
    from bitserve.quantization.grid import QuantSpec

    if cpu_native.library() is None:
        pytest.skip("our CPU kernel does not build here")
    # the int8 head runs on our kernel too (an fp32 head is torch.mm's, whose rows depend on
    # the batch)
    runner = LlamaRunner(_tiny_llama(QuantSpec(4, 32)), 6, 64, torch.int8)
    assert runner.cpu_decode is not None
    runner.cpu_decode = calls = _counted(runner.cpu_decode)
    # slots 3-5 hold the same prompts as 0-2 (prefill is row by row); decode 0-2 together, 3-5
    # alone, under different thread counts
    for slot, n in enumerate([9, 3, 20] * 2):
        ids = torch.randint(0, 40, (1, n), generator=torch.Generator().manual_seed(n))
        runner.forward(ids, torch.tensor([slot]), torch.tensor([0]))
    ids = torch.tensor([[7], [11], [13]])
    threads = torch.get_num_threads()
    together = runner.forward(ids, torch.tensor([0, 1, 2]), torch.tensor([9, 3, 20]))
    try:
        torch.set_num_threads(1)
        alone = [
            runner.forward(ids[r : r + 1], torch.tensor([3 + r]), torch.tensor([[9, 3, 20][r]]))
            for r in range(3)
        ]
    finally:
        torch.set_num_threads(threads)
    for r in range(3):
        assert torch.equal(together[r], alone[r][0]), r
    assert torch.equal(runner.k_cache[:, :3], runner.k_cache[:, 3:])
    assert calls.count == 6 + 4  # six prefills, then four decode steps


def test_torch_profiler_sees_our_c_calls() -> None:
    """Our kernel and the C step are ctypes calls, not aten ops: while a torch profiler records,
    each runs inside a named range."""
    from torch.profiler import profile

    from bitserve.kernels import cpu_native
    from bitserve.quantization.grid import QuantSpec

    if cpu_native.library() is None:
        pytest.skip("our CPU kernel does not build here")
    runner = LlamaRunner(_tiny_llama(QuantSpec(4, 32)), 1, 16)
    runner.forward(torch.tensor([[3, 4]]), torch.tensor([0]), torch.tensor([0]))
    with profile() as prof:
        runner.forward(torch.tensor([[5]]), torch.tensor([0]), torch.tensor([2]))
        runner.layers[0].o(torch.randn(1, 96))  # a QuantLinear on our kernel
    names = [e.name for e in prof.events()]
    assert names.count("bitserve::decode") == 1 and names.count("bitserve::gemv") == 1


def test_cpu_c_decode_step_refuses_what_would_read_out_of_bounds() -> None:
    """Slots, positions and row widths are checked before the C runs; so are the shapes of the
    projections when the step is built."""
    import dataclasses

    from bitserve.kernels import cpu_native
    from bitserve.quantization.grid import QuantSpec
    from bitserve.server.runner import _native_projection

    lib = cpu_native.library()
    if lib is None:
        pytest.skip("our CPU kernel does not build here")
    runner = LlamaRunner(_tiny_llama(QuantSpec(4, 32)), num_slots=2, max_len=16)
    step = runner.cpu_decode
    assert step is not None
    h = torch.randn(1, 96)
    for slots, pos in (([2], [0]), ([-1], [0]), ([0], [16]), ([0, 1], [0])):
        with pytest.raises(ValueError, match="slots|positions"):
            step(h, torch.tensor(slots), torch.tensor(pos))
    with pytest.raises(ValueError, match="rows of 96"):
        step(torch.randn(1, 64), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="rows of 96"):
        step(h.double(), torch.tensor([0]), torch.tensor([0]))
    layer = cpu_native.DecodeLayer(
        *(
            _native_projection(m)
            for m in (
                runner.layers[0].qkv,
                (runner.layers[0].o,),
                runner.layers[0].gate_up,
                (runner.layers[0].down,),
            )
        ),
        (runner.layers[0].attn_norm.weight, 1e-5),
        (runner.layers[0].mlp_norm.weight, 1e-5),
        runner.k_cache[0],
        runner.v_cache[0],
    )
    with pytest.raises(ValueError, match="projection of shape"):
        cpu_native.decoder(
            lib, [dataclasses.replace(layer, o=layer.down)], 4, runner.cos, runner.signed_sin, 1.0
        )
    with pytest.raises(ValueError, match="K/V caches"):
        cpu_native.decoder(
            lib,
            [dataclasses.replace(layer, v_cache=runner.v_cache[0, :1])],
            4,
            runner.cos,
            runner.signed_sin,
            1.0,
        )
    with pytest.raises(ValueError, match="fp32"):
        cpu_native.decoder(lib, [layer], 4, runner.cos.double(), runner.signed_sin, 1.0)
    # K/V caches: fp32 or fp16, both the same
    bf16 = dataclasses.replace(
        layer, k_cache=layer.k_cache.bfloat16(), v_cache=layer.v_cache.bfloat16()
    )
    with pytest.raises(ValueError, match="fp32 or fp16"):
        cpu_native.decoder(lib, [bf16], 4, runner.cos, runner.signed_sin, 1.0)
    with pytest.raises(ValueError, match="contiguous fp16 here, not a contiguous torch.float32"):
        cpu_native.decoder(
            lib,
            [dataclasses.replace(layer, k_cache=layer.k_cache.half())],
            4,
            runner.cos,
            runner.signed_sin,
            1.0,
        )
    with pytest.raises(ValueError, match="whole query groups"):
        cpu_native.decoder(lib, [layer], 3, runner.cos, runner.signed_sin, 1.0)
    # a weight whose bytes per column say 3-bit storage: the C refuses it before reading it
    p = dict(layer.o[0])
    w = p["native_weight"]
    p["native_weight"] = torch.zeros(*w.shape[:2], lib.cols * 3, dtype=torch.uint8)
    odd = cpu_native.decoder(
        lib,
        [dataclasses.replace(layer, o=(p, *layer.o[1:]))],
        4,
        runner.cos,
        runner.signed_sin,
        1.0,
    )
    with pytest.raises(ValueError, match="neither 4 nor 8 bits"):
        odd(torch.randn(1, 96), torch.tensor([0]), torch.tensor([0]))
    h = torch.randn(1, 96)
    ok = cpu_native.decoder(lib, [layer], 4, runner.cos, runner.signed_sin, 1.0)
    ok(h, torch.tensor([0]), torch.tensor([0]))
    assert torch.isfinite(h).all()


@pytest.mark.slow
def test_c_decode_step_greedy_tokens_are_the_reference_backends(tmp_path: Path) -> None:
    """The default model's W4 checkpoint prefilled and decoded greedily by the runner's
    one-C-call step: every token is the reference backend's argmax (one teacher-forced pass of
    a copy)."""
    import copy

    from bitserve.kernels import cpu_native
    from bitserve.models import fetch_default
    from bitserve.quantization.checkpoint import set_backends
    from bitserve.quantization.quantize import quantize_to_checkpoint

    if cpu_native.library() is None:
        pytest.skip("our CPU kernel does not build here")
    path = quantize_to_checkpoint(fetch_default(), tmp_path / "w4", "rtn", progress=False)
    loaded = load_model(path)
    reference = copy.deepcopy(loaded.model)
    set_backends(reference, "reference")
    prompt = loaded.tokenizer("The history of the city begins")["input_ids"]
    runner = LlamaRunner(loaded.model, 1, 64)  # the model's fp32 head, as the reference's
    assert runner.cpu_decode is not None
    runner.cpu_decode = calls = _counted(runner.cpu_decode)
    tokens = list(prompt)
    logits = runner.forward(torch.tensor([prompt]), torch.tensor([0]), torch.tensor([0]))
    for _ in range(16):
        tokens.append(int(logits[0].argmax()))
        logits = runner.forward(
            torch.tensor([tokens[-1:]]), torch.tensor([0]), torch.tensor([len(tokens) - 1])
        )
    assert calls.count == 17  # the prompt's prefill and every decode step ran in C
    with torch.inference_mode():
        ref = reference(torch.tensor([tokens])).logits[0, len(prompt) - 1 : -1].argmax(-1)
    assert ref.tolist() == tokens[len(prompt) :]


def test_runner_keeps_torch_ops_where_the_c_step_cannot_read_a_weight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A norm weight the C step cannot take (not contiguous) leaves the runner on `_cpu_step`,
    with a warning that says why, not a failed start."""
    from bitserve.quantization.grid import QuantSpec

    model = _tiny_llama(QuantSpec(4, 32))
    norm = model.model.layers[1].post_attention_layernorm
    norm.weight = torch.nn.Parameter(torch.rand(2 * 96)[::2])  # the same shape, strided
    with caplog.at_level("WARNING", logger="bitserve.runner"):
        runner = LlamaRunner(model, 1, 16)
    assert runner.cpu_decode is None and runner.cpu_rows is not None
    assert "torch's ops between the matmuls" in caplog.text and "contiguous" in caplog.text
    logits = runner.forward(torch.tensor([[3, 4]]), torch.tensor([0]), torch.tensor([0]))
    assert torch.isfinite(logits).all()


def test_cpu_decode_step_is_kept_for_fp32_models_whose_projections_fuse() -> None:
    """A half-precision model, or one whose q/k/v could not be fused, keeps the generic step."""
    from bitserve.quantization.grid import QuantSpec

    assert LlamaRunner(_tiny_llama(None).to(torch.bfloat16), 1, 8).cpu_rows is None
    model = _tiny_llama(QuantSpec(4, 32))
    attn = model.model.layers[0].self_attn
    attn.k_proj.bias = torch.zeros(attn.k_proj.out_features)  # q/k/v differ: not fused
    assert LlamaRunner(model, 1, 8).cpu_rows is None


def test_static_decode_steps_match_eager(server_tiny_checkpoint: Path) -> None:
    """The decode step that CUDA graphs capture (batch padded to 4 rows writing to a spare slot,
    attention over a fixed cache length, inputs copied into static buffers) gives the eager
    runner's logits, step after step, for slots in any order; prefill stays eager."""
    eager = LlamaRunner(load_model(server_tiny_checkpoint).model, num_slots=3, max_len=64)
    static = LlamaRunner(
        load_model(server_tiny_checkpoint).model, num_slots=3, max_len=64, decode_graphs=True
    )
    assert static.k_cache.shape[1] == 4 and eager.k_cache.shape[1] == 3  # the spare slot
    g = torch.Generator().manual_seed(2)
    lens = [9, 3, 14]
    for r in (eager, static):
        for slot, n in enumerate(lens):
            ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(slot))
            r.forward(ids, torch.tensor([slot]), torch.tensor([0]))
    for step in range(5):
        slots = [2, 0, 1] if step % 2 else [1, 2]  # 3 rows pad to 4, 2 rows are a bucket
        ids = torch.randint(0, 1000, (len(slots), 1), generator=g)
        starts = torch.tensor([lens[s] for s in slots])
        a = eager.forward(ids, torch.tensor(slots), starts)
        b = static.forward(ids, torch.tensor(slots), starts)
        # fp32 attention over another cache length rounds differently (2e-5 through the
        # default int16-activation kernel, which passes on what bf16 activations rounded away)
        assert b.shape == a.shape and rel_err(b, a) < 1e-4, step
        for s in slots:
            lens[s] += 1
    assert set(static._decodes) == {(4, 64), (2, 64)}  # kv length: the cache's, below 256
    assert rel_err(static.k_cache[:, :3], eager.k_cache) < 1e-4  # padded rows wrote elsewhere


def test_cleared_slot_hides_what_a_broken_sequence_left(server_tiny_checkpoint: Path) -> None:
    """NaN left in a slot's cache past the next occupant's length poisons its (masked) attention
    in a graphed decode step, which reads a fixed length; clear_slot, which the engine calls
    when a sequence fails, removes it."""
    runner = LlamaRunner(
        load_model(server_tiny_checkpoint).model, num_slots=2, max_len=64, decode_graphs=True
    )
    prompt = torch.tensor([[5, 6, 7, 8, 9]])

    def decode() -> torch.Tensor:
        runner.forward(prompt, torch.tensor([0]), torch.tensor([0]))
        return runner.forward(torch.tensor([[10]]), torch.tensor([0]), torch.tensor([5]))

    runner.k_cache[:, 0, :, 40:] = float("nan")  # an earlier occupant overflowed there
    assert torch.isnan(decode()).all()
    runner.clear_slot(0)
    assert torch.isfinite(decode()).all()


def test_batches_past_the_largest_graph_bucket_run_eager(server_tiny_checkpoint: Path) -> None:
    from bitserve.server.runner import GRAPH_BATCHES

    n = GRAPH_BATCHES[-1] + 1
    model = load_model(server_tiny_checkpoint).model
    runner = LlamaRunner(model, num_slots=n, max_len=8, decode_graphs=True)
    ids = torch.randint(0, 1000, (n, 1), generator=torch.Generator().manual_seed(3))
    logits = runner.forward(ids, torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert logits.shape[0] == n and not runner._decodes  # nothing captured for 257 rows
    few = runner.forward(ids[:3], torch.arange(3), torch.ones(3, dtype=torch.long))
    assert few.shape[0] == 3 and set(runner._decodes) == {(4, 8)}


def test_failed_capture_falls_back_to_eager(
    server_tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A decode step that cannot be captured (here: capture is attempted on the CPU, where
    CUDA calls fail) logs a warning, and the runner serves on eager with the same logits."""
    eager = LlamaRunner(load_model(server_tiny_checkpoint).model, num_slots=2, max_len=32)
    runner = LlamaRunner(
        load_model(server_tiny_checkpoint).model, num_slots=2, max_len=32, decode_graphs=True
    )
    runner._graphable = True  # as on CUDA
    ids, slots = torch.tensor([[5], [9]]), torch.tensor([0, 1])
    with caplog.at_level("WARNING", logger="bitserve.runner"):
        got = runner.forward(ids, slots, torch.tensor([0, 0]))
    assert "not captured in a CUDA graph" in caplog.text and not runner.decode_graphs
    assert rel_err(got, eager.forward(ids, slots, torch.tensor([0, 0]))) < 1e-5
    later = runner.forward(ids, slots, torch.tensor([1, 1]))  # eager from now on
    assert rel_err(later, eager.forward(ids, slots, torch.tensor([1, 1]))) < 1e-5


def test_failed_capture_with_pdl_retries_without_it(
    server_tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture that fails while Triton kernels launch with programmatic dependent launch turns
    PDL off and tries once more: if that capture works, decode runs from it without PDL; if it
    fails too, PDL was not the cause, so it is turned back on and decode runs eager."""
    triton_int = pytest.importorskip("bitserve.kernels.triton_int")
    monkeypatch.setattr(triton_int, "use_pdl", lambda device: triton_int.PDL_ENABLED)
    ids, slots, starts = torch.tensor([[5]]), torch.tensor([0]), torch.tensor([0])
    for pdl_only in (True, False):  # the capture fails only with PDL on / always
        monkeypatch.setattr(triton_int, "PDL_ENABLED", True)
        runner = LlamaRunner(
            load_model(server_tiny_checkpoint).model, num_slots=2, max_len=32, decode_graphs=True
        )
        runner._graphable = True
        attempts: list[bool] = []

        def replay(run, runner=runner, attempts=attempts, pdl_only=pdl_only):
            attempts.append(triton_int.PDL_ENABLED)
            if triton_int.PDL_ENABLED or not pdl_only:
                raise RuntimeError("capture failed")
            return run  # stands in for the graph's replay

        runner._replay = replay
        caplog.clear()
        with caplog.at_level("WARNING", logger="bitserve.runner"):
            runner.forward(ids, slots, starts)
        assert attempts == [True, False] and "retrying without it" in caplog.text
        assert triton_int.PDL_ENABLED is not pdl_only
        assert runner.decode_graphs is pdl_only
        assert ("running eager" in caplog.text) is not pdl_only
        assert torch.isfinite(runner.forward(ids, slots, starts + 1)).all()


def test_warmup_runs_every_bucket_and_leaves_the_cache_clean(server_tiny_checkpoint: Path) -> None:
    """The start-up warm-up prefills once per matmul M bucket up to the prefill chunk, decodes
    once per padded batch size up to the slot count (5 slots: batches 1, 2, 4 and 8, each a
    static decode step as CUDA graphs capture), zeroes the cache, and changes nothing
    that serving computes afterwards."""
    runner = LlamaRunner(
        load_model(server_tiny_checkpoint).model, num_slots=5, max_len=128, decode_graphs=True
    )
    fresh = LlamaRunner(
        load_model(server_tiny_checkpoint).model, num_slots=5, max_len=128, decode_graphs=True
    )
    runs = runner.warmup(prefill_tokens=100)
    prefills = [2, 4, 16, 64, 100]  # the tuner's buckets, the last cut to the prefill chunk
    assert runs == [("prefill", t) for t in prefills] + [("decode", rows) for rows in (1, 2, 4, 5)]
    assert set(runner._decodes) == {(b, 128) for b in (1, 2, 4, 8)}
    assert not runner.k_cache.any() and not runner.v_cache.any()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(4))
    slots, starts = torch.tensor([3, 1]), torch.tensor([0, 0])
    assert rel_err(runner.forward(ids, slots, starts), fresh.forward(ids, slots, starts)) < 1e-6
    nxt, pos = torch.tensor([[9], [11]]), torch.tensor([7, 7])
    assert rel_err(runner.forward(nxt, slots, pos), fresh.forward(nxt, slots, pos)) < 1e-6


def test_prompts_share_the_chunks_they_hold_in_common(server_tiny_checkpoint: Path) -> None:
    """Sequences whose prompts hold the same tokens up to the end of a chunk prefill that
    chunk once: three choices of one prompt compute it once, two prompts opening with the same
    two chunks compute those once. Each sequence's slot then holds the K/V its prefill alone
    writes and it samples (seeded) the tokens it samples alone. If the sequence that computes
    is aborted mid-prefill, another computes on."""
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    settings = Settings(max_num_seqs=4, max_model_len=64, prefill_chunk=8)
    prompt = list(range(5, 25))  # three chunks of at most 8

    def run(
        prompts: list[list[int]], seeds: list[int], abort_first_after: int | None = None
    ) -> tuple[list[list[int]], float, list[torch.Tensor]]:
        engine = build_state(load_model(server_tiny_checkpoint), settings).engine
        outs: dict[int, list[Any]] = {i: [] for i in range(len(prompts))}
        seqs = [
            engine.new_sequence(
                i, p, SamplingParams(max_tokens=5, temperature=1.0, seed=seed), outs[i].append
            )
            for i, (p, seed) in enumerate(zip(prompts, seeds, strict=True))
        ]
        engine.submit(seqs)
        steps = 0
        while engine.running or engine.waiting:
            engine.step()
            steps += 1
            if steps == abort_first_after:
                engine.abort(seqs[:1])
        tokens = [[t for o in outs[i] for t in o.token_ids] for i in range(len(prompts))]
        computed = engine.m.prompt_tokens.labels(**engine.label)._value.get()
        shared = engine.m.shared_prompt_tokens.labels(**engine.label)._value.get()
        if abort_first_after is None:  # every prompt token computed once or copied
            assert computed + shared == sum(len(s.prompt_ids) for s in seqs)
        keys = [engine.runner.k_cache[:, s.slot, :, : len(s.prompt_ids)] for s in seqs]
        return tokens, computed, keys

    def alone(prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
        runs = [run([p], [i]) for i, p in enumerate(prompts)]
        return [r[0][0] for r in runs], [r[2][0] for r in runs]

    tokens, computed, keys = run([prompt] * 3, [0, 1, 2])
    tokens_alone, keys_alone = alone([prompt] * 3)
    assert computed == len(prompt) and tokens == tokens_alone and len(set(map(tuple, tokens))) > 1
    assert all(
        torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(keys, keys_alone, strict=True)
    )

    forked = [prompt[:16] + [30, 31, 32], prompt[:16] + [40, 41]]
    tokens, computed, keys = run(forked, [0, 1])
    tokens_alone, keys_alone = alone(forked)
    assert computed == 16 + 3 + 2 and tokens == tokens_alone
    assert all(torch.equal(a, b) for a, b in zip(keys, keys_alone, strict=True))

    tokens, computed, _ = run([prompt] * 3, [0, 1, 2], abort_first_after=1)
    assert tokens[1:] == alone([prompt] * 3)[0][1:] and computed == len(prompt)
