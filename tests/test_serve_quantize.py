"""`bitserve serve SRC --quantize METHOD:wBITSgGROUP [--quality-gate PCT]`: quantize once, cache
by source hash and arguments, and refuse to serve a model that lost too much quality."""

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitserve.cli import main
from bitserve.errors import QualityGateError, UsageError
from bitserve.quantization.checkpoint import WEIGHTS, read_manifest, sha256_file
from bitserve.quantization.eval import perplexity
from bitserve.server.cli import parse_quantize, quality_gate, resolve_checkpoint


@pytest.fixture()
def src(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BITSERVE_MODELS", str(tmp_path / "models"))
    text = "Some text to measure perplexity on, again and again. " * 60
    (tmp_path / "text.txt").write_text(text)
    path = save_tiny_model(tmp_path / "src", "llama")
    # A few training steps on the text, so that 2-bit rounding measurably hurts perplexity.
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = AutoTokenizer.from_pretrained(path)(text[:600], return_tensors="pt").input_ids
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path


def test_parse_quantize() -> None:
    method, spec, tune = parse_quantize("gptq:w4g128")
    assert (method, spec.bits, spec.group_size, spec.sym, tune) == ("gptq", 4, 128, False, 0)
    method, spec, tune = parse_quantize("awq:w3g64-sym")
    assert (method, spec.bits, spec.group_size, spec.sym) == ("awq", 3, 64, True)
    assert parse_quantize("w8gch")[1].group_size == -1
    assert parse_quantize("signround:w2g64+tune")[2] == 64
    assert parse_quantize("rtn:w4g32-sym+tune12")[1:] == (parse_quantize("rtn:w4g32-sym")[1], 12)
    for bad in ("gptq:4bit", "rtn:w4g128+tune0", "rtn:w4g128+tunes"):
        with pytest.raises(UsageError, match="expected METHOD:wBITSgGROUP"):
            parse_quantize(bad)
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        parse_quantize("nope:w4g128")


def test_quantize_once_then_reuse_the_cache(src: Path) -> None:
    first = resolve_checkpoint(str(src), "rtn:w4g64")
    stamp = (first / WEIGHTS).stat().st_mtime_ns
    assert read_manifest(first)["quantization"]["group_size"] == 64
    assert resolve_checkpoint(str(src), "rtn:w4g64") == first
    assert (first / WEIGHTS).stat().st_mtime_ns == stamp  # not quantized again
    other = resolve_checkpoint(str(src), "rtn:w8gch")
    assert other != first and read_manifest(other)["quantization"]["bits"] == 8
    with pytest.raises(UsageError, match="already a quantized checkpoint"):
        resolve_checkpoint(str(first), "rtn:w4g64")


def test_damaged_cache_is_quantized_again(src: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cached checkpoint whose weights were damaged on disk (or whose file went missing) is
    quantized again, with a warning, instead of failing every start until deleted by hand."""
    first = resolve_checkpoint(str(src), "rtn:w4g64")
    digest = sha256_file(first / WEIGHTS)
    with open(first / WEIGHTS, "r+b") as f:  # flip bytes in the middle of the tensor data
        f.seek((first / WEIGHTS).stat().st_size // 2)
        f.write(b"\xff\x00\xff\x00")
    with caplog.at_level("WARNING", logger="bitserve"):
        again = resolve_checkpoint(str(src), "rtn:w4g64")
    assert again == first and sha256_file(first / WEIGHTS) == digest
    assert "is damaged" in caplog.text and "SHA-256 mismatch" in caplog.text
    (first / WEIGHTS).unlink()
    assert resolve_checkpoint(str(src), "rtn:w4g64") == first
    assert sha256_file(first / WEIGHTS) == digest


def test_calib_for_a_method_that_reads_none_is_refused_even_when_cached(src: Path) -> None:
    calib = src.parent / "text.txt"
    resolve_checkpoint(str(src), "rtn:w4g64")  # a cache exists either way
    with pytest.raises(UsageError, match="'rtn' uses no calibration data"):
        resolve_checkpoint(str(src), "rtn:w4g64", calib)
    assert resolve_checkpoint(str(src), "rtn:w4g64+tune2", calib).name.startswith("src-rtn")


def test_serving_a_cached_checkpoint_hashes_its_weights_once(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resolve_checkpoint checks a cache's SHA-256; loading it for serving does not again
    (seconds per start for a model of some GB)."""
    import bitserve.quantization.checkpoint as checkpoint
    from bitserve.server.cli import _prepare_state
    from bitserve.server.settings import Settings

    resolve_checkpoint(str(src), "rtn:w4g64")
    hashed: list[str] = []
    real = checkpoint.sha256_file

    def counting(path: Path, chunk: int = 1 << 22) -> str:
        hashed.append(Path(path).name)
        return real(path, chunk)

    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    settings = Settings(model=str(src), quantize="rtn:w4g64", max_model_len=64, warmup=False)
    _prepare_state(settings)
    assert hashed.count(WEIGHTS) == 1


def test_quantize_and_tune_once(src: Path) -> None:
    """'+tuneN' quantizes, tunes the scales on the calibration text, and caches the result apart
    from the untuned checkpoint, whose cache key is unchanged."""
    calib = src.parent / "text.txt"
    plain = resolve_checkpoint(str(src), "rtn:w4g32")
    tuned = resolve_checkpoint(str(src), "rtn:w4g32+tune3", calib)
    assert tuned != plain and tuned.name.startswith("src-rtn-w4g32-tune3-")
    assert "tune" not in read_manifest(plain)
    record = read_manifest(tuned)["tune"]
    assert record["steps"] == 3 and record["calibration"]["path"].endswith("text.txt")
    assert resolve_checkpoint(str(src), "rtn:w4g32+tune3", calib) == tuned  # cached


def test_quality_gate_passes_and_records(src: Path) -> None:
    ckpt = resolve_checkpoint(str(src), "rtn:w8gch")
    result = quality_gate(ckpt, str(src), src.parent / "text.txt", 5.0)
    stored = read_manifest(ckpt)["quality"]
    assert stored["rise_pct"] == pytest.approx(result["rise_pct"]) and abs(stored["rise_pct"]) < 5
    assert stored["source_perplexity"] > 1


def test_quality_gate_measures_again_when_the_text_changed(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored gate result is reused only for the same text (by SHA-256, not by path): a file
    edited in place is measured again."""
    ckpt = resolve_checkpoint(str(src), "rtn:w8gch")
    text = src.parent / "text.txt"
    first = quality_gate(ckpt, str(src), text, 50.0)
    calls: list[Path] = []
    measure = perplexity

    def counted(model: object, tok: object, path: Path, *args: object) -> dict:
        calls.append(path)
        return measure(model, tok, path, *args)

    monkeypatch.setattr("bitserve.quantization.eval.perplexity", counted)
    assert quality_gate(ckpt, str(src), text, 50.0)["perplexity"] == first["perplexity"]
    assert calls == []  # the same text: the stored result
    text.write_text("Quite different words now, in another order entirely. " * 60)
    again = quality_gate(ckpt, str(src), text, 50.0)
    assert len(calls) == 2 and again["perplexity"] != first["perplexity"]
    assert read_manifest(ckpt)["quality"]["text_sha256"] == sha256_file(text)


def test_quality_gate_refuses_in_one_line(
    src: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def served(*args: object, **kwargs: object) -> None:
        raise AssertionError("served despite the quality gate")

    monkeypatch.setattr("uvicorn.Server.run", served)
    text = src.parent / "text.txt"
    args = [
        "serve",
        str(src),
        "--quantize",
        "rtn:w2g32",
        "--quality-gate",
        "0.001",
        "--gate-text",
        str(text),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err  # progress bars, then the one-line error
    assert err.endswith("more than --quality-gate 0.001%; not serving\n") and "Traceback" not in err
    assert err.count("bitserve: error: ") == 1
    ckpt = resolve_checkpoint(str(src), "rtn:w2g32")
    assert read_manifest(ckpt)["quality"]["rise_pct"] > 0.001  # stored even though refused
    with pytest.raises(QualityGateError):
        quality_gate(ckpt, str(src), text, 0.001)
    assert main(["serve", str(src), "--quantize", "rtn:w2g32", "--quality-gate", "1"]) == 2
    assert "--quality-gate needs --gate-text" in capsys.readouterr().err
