"""`bitserve report` end to end on a tiny random-init model: every method x bits row, the
full-precision baseline, the Markdown table and the PNG plot."""

import json
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest
import torch
from test_gptq import TEXT
from tiny_models import save_tiny_model

from bitserve.cli import main
from bitserve.models import load_model
from bitserve.quantization.eval import perplexity


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    save_tiny_model(root / "src", "llama")
    (root / "calib.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(
            [
                "report", "--model", str(root / "src"), "--methods", "rtn,gptq,awq",
                "--bits", "4,3", "--group-size", "64", "--calib", str(root / "calib.txt"),
                "--nsamples", "4", "--seqlen", "48", "--max-windows", "6",
                "--text", str(root / "eval.txt"), "--out", str(root / "out"), "--quiet",
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return root


def test_report_json_rows(report_dir: Path) -> None:
    report = json.loads((report_dir / "out" / "report.json").read_text())
    rows = {(r["method"], r["bits"], r["group_size"]): r for r in report["results"]}
    assert set(rows) == {(m, b, 64) for m in ("rtn", "gptq", "awq") for b in (4, 3)}
    loaded = load_model(report_dir / "src")
    fp = perplexity(loaded.model, loaded.tokenizer, report_dir / "eval.txt", 48, 6, progress=False)
    assert report["full_precision"]["perplexity"] == pytest.approx(fp["perplexity"], rel=1e-6)
    assert report["full_precision"]["bits_per_weight"] == 32
    fp_ppl = fp["perplexity"]
    for (_, bits, _), r in rows.items():
        assert r["delta_pct"] == pytest.approx(100 * (r["perplexity"] / fp_ppl - 1))
        # codes plus an fp16 scale and a zero per 64 weights (short last group: 160 = 64+64+32)
        assert bits < r["bits_per_weight"] < bits + 0.5
        assert r["quant_seconds"] > 0 and Path(r["checkpoint"]).is_dir()
    for m in ("rtn", "gptq", "awq"):
        assert rows[(m, 3, 64)]["size_bytes"] < rows[(m, 4, 64)]["size_bytes"]
    # a row's perplexity is its checkpoint's, measured again from disk
    ck = load_model(rows[("gptq", 3, 64)]["checkpoint"])
    again = perplexity(ck.model, ck.tokenizer, report_dir / "eval.txt", 48, 6, progress=False)
    assert rows[("gptq", 3, 64)]["perplexity"] == pytest.approx(again["perplexity"], rel=1e-5)


def test_report_markdown_and_plot(report_dir: Path) -> None:
    md = (report_dir / "out" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 1 + 6  # header, full precision, 3 methods x 2 bit widths
    assert any(line.startswith("| gptq | 3 | 64 |") for line in table)
    png = report_dir / "out" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 300


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--bits", "4,5", "--bits '4,5': each value must be one of"),
        ("--methods", "rtn,nope", "unknown method 'nope'"),
        ("--group-size", "x", "--group-size must be comma-separated integers"),
        ("--tune-steps", "4", "--tune-steps: it needs --calib FILE"),
        ("--tune-steps", "-1", "--tune-steps must be >= 0"),
    ],
)
def test_report_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    argv = ["report", "--text", str(text), "--out", str(tmp_path / "out"), flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_report_refuses_tuning_a_method_without_int_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    argv = ["report", "--text", str(text), "--out", str(tmp_path / "out"), "--methods", "bcq"]
    assert main([*argv, "--calib", str(text), "--tune-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "--tune-steps: bcq writes no int layers" in err and err.count("\n") == 1


def test_report_with_tuning(tmp_path: Path) -> None:
    """--tune-steps adds a METHOD+tuneN row per checkpoint: the same codes with tuned scales,
    its own perplexity, and the tuning time added to the quantization time."""
    save_tiny_model(tmp_path / "src", "llama")
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "eval.txt").write_text(TEXT[::-1])
    rc = main(
        [
            "report", "--model", str(tmp_path / "src"), "--methods", "rtn", "--bits", "3",
            "--group-size", "32", "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4",
            "--seqlen", "48", "--max-windows", "6", "--text", str(tmp_path / "eval.txt"),
            "--out", str(tmp_path / "out"), "--quiet", "--tune-steps", "3",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    plain, tuned = report["results"]
    assert (plain["method"], tuned["method"]) == ("rtn", "rtn+tune3")
    assert tuned["perplexity"] != plain["perplexity"]
    assert tuned["quant_seconds"] > plain["quant_seconds"]
    assert tuned["bits_per_weight"] == plain["bits_per_weight"]
    codes = [
        load_model(r["checkpoint"]).model.model.layers[0].mlp.down_proj for r in (plain, tuned)
    ]
    assert torch.equal(codes[0].qweight, codes[1].qweight)
    assert not torch.equal(codes[0].scales, codes[1].scales)
    assert "| rtn+tune3 | 3 | 32 |" in (tmp_path / "out" / "report.md").read_text()
