"""End-to-end on the embedded default model (SmolLM2-135M-Instruct): quality of RTN on
WikiText-2 test, a greedy chat answer, and save/load fidelity. Slow: run in CI."""

from pathlib import Path

import pytest
import torch

from bitserve.kernels import cpu_native
from bitserve.models import fetch_default, load_model
from bitserve.quantization import get_method
from bitserve.quantization.checkpoint import load_checkpoint
from bitserve.quantization.eval import perplexity
from bitserve.quantization.grid import QuantSpec
from bitserve.quantization.pipeline import quantize_model, swap_in_quant_linears
from bitserve.quantization.quantize import quantize_to_checkpoint

pytestmark = pytest.mark.slow
TEST_TXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/test.txt"


@pytest.fixture(scope="module")
def default_src() -> Path:
    return fetch_default()


@pytest.fixture(scope="module")
def w4(default_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default") / "w4g128"
    return quantize_to_checkpoint(default_src, out, "rtn", QuantSpec(4, 128), progress=False)


def test_w4_chat_answer_contains_paris(w4: Path) -> None:
    loaded = load_checkpoint(w4)
    tok = loaded.tokenizer
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = loaded.model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_w4_save_load_equals_in_memory(default_src: Path, w4: Path) -> None:
    model = load_model(default_src).model
    quantized, _ = quantize_model(model, get_method("rtn"), QuantSpec(4, 128), None, progress=False)
    swap_in_quant_linears(model, quantized)
    for p in model.parameters():
        p.data = p.data.half().float()
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            load_checkpoint(w4, backend="reference").model(ids).logits,
            model(ids).logits,
            rtol=1e-3,
            atol=1e-3,
        )


@pytest.mark.skipif(not TEST_TXT.is_file(), reason="WikiText-2 not available (../shared)")
def test_rtn_perplexity_on_wikitext(default_src: Path, w4: Path, tmp_path: Path) -> None:
    def ppl(path: Path) -> float:
        loaded = load_model(path)
        return perplexity(loaded.model, loaded.tokenizer, TEST_TXT, 512, 40, progress=False)[
            "perplexity"
        ]

    fp = ppl(default_src)
    assert 20 < fp < 30  # reference: 25.6
    assert ppl(w4) < fp * 1.27
    w8 = quantize_to_checkpoint(
        default_src, tmp_path / "w8", "rtn", QuantSpec(8, -1), progress=False
    )
    assert ppl(w8) < fp * 1.01


def test_whole_prefill_chunks_reused_give_the_same_cache_and_tokens(w4: Path) -> None:
    """On the default W4 model: a prompt that reuses the whole prefill chunks another prompt
    left in a slot gets the KV cache and sampled tokens of its own prefill on a fresh engine,
    bit for bit. With --prefix-cache, which reuses a prefix ending mid-chunk, the cache differs
    where a prompt prefilled in two parts rounds differently from one prefilled whole (torch's
    ops), and is the same where prompts prefill in the CPU's C step (each token a row of its
    own: its K/V depend on the tokens alone)."""
    from bitserve.server.cli import build_state
    from bitserve.server.sampling import SamplingParams
    from bitserve.server.settings import Settings

    pre = list(range(1000, 1040))
    first, second = pre + [2000, 2001, 2002], pre + [3000, 3001]

    def run(cache: bool, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor, int, bool]:
        """The last prompt's seeded tokens, cache and cached count, after the others ran, and
        whether prompts prefilled in the C step."""
        settings = Settings(max_num_seqs=2, max_model_len=96, prefill_chunk=16, prefix_cache=cache)
        engine = build_state(load_model(w4), settings).engine
        for prompt in prompts:
            outs: list = []
            params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
            seq = engine.new_sequence(0, prompt, params, outs.append)
            engine.submit([seq])
            while engine.running or engine.waiting:
                engine.step()
        keys = engine.runner.k_cache[:, seq.slot, :, : len(prompt) + 7].clone()
        c_step = engine.runner.cpu_decode is not None
        return [t for o in outs for t in o.token_ids], keys, seq.cached, c_step

    alone = run(False, [second])
    reused = run(False, [first, second])
    assert reused[2] == 32 and reused[0] == alone[0] and torch.equal(reused[1], alone[1])
    approx = run(True, [first, second])
    assert approx[2] == len(pre) and torch.equal(approx[1], alone[1]) == approx[3]
    assert approx[3] == (cpu_native.library() is not None)  # the C step runs where ours builds
    if approx[3]:
        assert approx[0] == alone[0]
