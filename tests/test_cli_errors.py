"""User mistakes on the command line end in one line on stderr and exit code 2 (README), never a
traceback: bad flags and settings, and checkpoints that are incomplete, quantized already or
corrupt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_main
from tiny_models import save_tiny_model

from bitserve.quantization.checkpoint import MANIFEST, WEIGHTS, sha256_file
from bitserve.quantization.grid import QuantSpec
from bitserve.quantization.quantize import quantize_to_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """src/ (tiny HF llama), ckpt/ (its RTN W4 g32 checkpoint) and text.txt."""
    root = tmp_path_factory.mktemp("cli-errors")
    src = save_tiny_model(root / "src", "llama")
    quantize_to_checkpoint(src, root / "ckpt", "rtn", QuantSpec(4, 32), progress=False)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return root


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `serve` that got past its checks would block the test: fail instead."""
    import uvicorn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve started although its arguments were bad")

    monkeypatch.setattr(uvicorn, "run", refuse)
    for key in list(os.environ):
        if key.startswith("BITSERVE_") and key != "BITSERVE_MODELS":
            monkeypatch.delenv(key)


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("bitserve"), err
    for text in expected:
        assert text in err, err


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# Finding 1: a checkpoint whose manifest is missing is never loaded as a plain HF model.


@pytest.fixture
def no_manifest(work: Path, tmp_path: Path) -> Path:
    ckpt = _copy(work / "ckpt", tmp_path / "ckpt")
    (ckpt / MANIFEST).unlink()
    return ckpt


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "CKPT", "--prompt", "abc", "--max-new-tokens", "2"],
        ["eval", "CKPT", "--text", "TEXT", "--seqlen", "16", "--max-windows", "1"],
        ["serve", "CKPT", "--port", "0"],
    ],
    ids=["generate", "eval", "serve"],
)
def test_checkpoint_without_manifest_is_refused(
    work: Path, no_manifest: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        a.replace("CKPT", str(no_manifest)).replace("TEXT", str(work / "text.txt")) for a in command
    ]
    code, err = run_main(args, capsys)
    assert_one_line_error(code, err, "not a bitserve checkpoint", f"{MANIFEST} is missing")
    assert "quant_method 'bitserve'" in err


def test_checkpoint_without_manifest_or_quantization_config(
    no_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its packed weights alone give it away."""
    config = json.loads((no_manifest / "config.json").read_text())
    del config["quantization_config"]
    (no_manifest / "config.json").write_text(json.dumps(config))
    code, err = run_main(["generate", str(no_manifest), "--prompt", "abc"], capsys)
    assert_one_line_error(code, err, f"{MANIFEST} is missing", f"{WEIGHTS} was written by bitserve")


def test_serve_process_refuses_checkpoint_without_manifest(no_manifest: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", "serve", str(no_manifest), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,  # before the fix: it served the randomly re-initialised model
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("bitserve: error: ")
    assert f"{MANIFEST} is missing" in proc.stderr


# Finding 6: quantizing an already quantized checkpoint.


def test_quantize_refuses_a_checkpoint(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q2"
    code, err = run_main(["quantize", str(work / "ckpt"), "--out", str(out), "--bits", "2"], capsys)
    assert_one_line_error(code, err, "already a quantized checkpoint")
    assert not out.exists()


def test_report_refuses_a_checkpoint(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    args = ["report", "--model", str(work / "ckpt"), "--methods", "rtn", "--bits", "2"]
    args += ["--group-size", "32", "--text", str(work / "text.txt"), "--seqlen", "16"]
    code, err = run_main([*args, "--max-windows", "1", "--out", str(out), "--quiet"], capsys)
    assert_one_line_error(code, err, "already a quantized checkpoint")
    assert not (out / "report.json").exists()


# Finding 7: bad arguments and settings.


@pytest.mark.parametrize(
    "command,expected",
    [
        ("serve CKPT --port 70000", ["--port 70000", "65535"]),
        ("serve CKPT --max-num-seqs 0", ["--max-num-seqs 0", "greater than or equal"]),
        ("serve CKPT --max-model-len 4", ["--max-model-len 4", "8"]),
        ("serve CKPT --prefill-chunk 0", ["--prefill-chunk 0"]),
        ("serve CKPT --threads 0", ["--threads 0"]),
        ("serve CKPT --kv-cache-mib 0", ["--kv-cache-mib 0"]),
        ("serve CKPT --kv-cache-dtype int4", ["--kv-cache-dtype", "'int4'"]),
        ("serve CKPT --log-level bogus", ["--log-level bogus", "debug"]),
        ("serve CKPT --backend bogus", ["--backend bogus", "reference"]),
        ("generate CKPT --prompt abc --backend bogus", ["--backend bogus", "reference"]),
        ("eval CKPT --text TEXT --backend bogus", ["--backend bogus", "unknown backend"]),
        ("generate CKPT --prompt abc --max-new-tokens 0", ["--max-new-tokens"]),
        ("generate CKPT --prompt abc --max-new-tokens -5", ["--max-new-tokens"]),
        (["generate", "CKPT", "--prompt", ""], ["--prompt", "empty"]),
        ("eval CKPT --text TEXT --seqlen 0", ["--seqlen", "at least 2"]),
        ("eval CKPT --text TEXT --seqlen 1", ["--seqlen", "at least 2"]),
        ("eval CKPT --text TEXT --max-windows 0", ["--max-windows"]),
        ("eval CKPT --text TEXT --batch-size 0", ["--batch-size"]),
        ("eval CKPT --text TEXT --seqlen x", ["--seqlen", "'x'"]),
        (
            "quantize SRC --out OUT --method gptq --calib TEXT --nsamples 0",
            ["--nsamples", "at least 1"],
        ),
        ("quantize SRC --out OUT --seqlen 0", ["--seqlen"]),
        ("report --text TEXT --out OUT --max-windows 0", ["--max-windows"]),
    ],
)
def test_bad_arguments_are_one_line(
    work: Path,
    tmp_path: Path,
    command: str | list[str],
    expected: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    subs = {
        "CKPT": str(work / "ckpt"),
        "SRC": str(work / "src"),
        "TEXT": str(work / "text.txt"),
        "OUT": str(tmp_path / "out"),
    }
    args = command.split() if isinstance(command, str) else command
    code, err = run_main([subs.get(a, a) for a in args], capsys)
    assert_one_line_error(code, err, *expected)
    assert not (tmp_path / "out").exists()


def test_backend_that_cannot_run_the_layers(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cpu` runs int layers only: on a BCQ checkpoint it is a usage error, not a ValueError."""
    bcq = quantize_to_checkpoint(
        work / "src", tmp_path / "bcq", "bcq", QuantSpec(2, 32), progress=False
    )
    capsys.readouterr()  # quantizing's progress bars
    code, err = run_main(["generate", str(bcq), "--prompt", "abc", "--backend", "cpu"], capsys)
    assert_one_line_error(code, err, "--backend cpu", "'cpu'")


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("BITSERVE_PORT", "abc", "BITSERVE_PORT='abc': input should be a valid integer"),
        ("BITSERVE_MAX_NUM_SEQS", "0", "BITSERVE_MAX_NUM_SEQS='0'"),
        ("BITSERVE_LOG_LEVEL", "loud", "BITSERVE_LOG_LEVEL='loud': unknown log level"),
    ],
)
def test_bad_environment_settings_are_one_line(
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    code, err = run_main(["serve", str(work / "ckpt")], capsys)
    assert_one_line_error(code, err, expected)


def test_inspect_reports_a_broken_safetensors_header(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken header whose checksum was updated to match: not a KeyError traceback."""
    ckpt = _copy(work / "ckpt", tmp_path / "ckpt")
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[10] ^= 0x01  # inside the header's first key ("__metadata__")
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = sha256_file(ckpt / WEIGHTS)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    code, err = run_main(["inspect", str(ckpt)], capsys)
    assert_one_line_error(code, err, f"{WEIGHTS}: unreadable safetensors file")


def test_errors_from_a_real_process(work: Path) -> None:
    """The installed entry point as a user runs it: argparse and settings errors alike."""
    for args, env, expected in [
        (["serve", str(work / "ckpt"), "--port", "70000"], {}, "--port 70000"),
        (["serve", str(work / "ckpt")], {"BITSERVE_PORT": "abc"}, "BITSERVE_PORT='abc'"),
        (["serve", str(work / "ckpt"), "--shutdown-timeout", "-1"], {}, "--shutdown-timeout -1"),
        (["generate", str(work / "ckpt"), "--prompt", "a", "--max-new-tokens", "0"], {}, "least 1"),
        # uvicorn's "trace" level, which `logging` does not know, gets as far as loading
        (["serve", str(work / "missing"), "--log-level", "trace"], {}, "no such file"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "bitserve.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr


def test_serve_loads_off_the_main_thread(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve` loads (and quantizes) on a thread that has exited before serving: torch's
    OpenMP team from that work must not outlive it beside the engine thread's (CPU decode
    steps ran 1.7-2.2x slower). Its errors still reach the user as one line."""
    from bitserve.errors import UsageError
    from bitserve.server import cli as serve_cli

    seen: list[threading.Thread] = []

    def prepare(settings: object) -> None:
        seen.append(threading.current_thread())
        raise UsageError("stop here")

    monkeypatch.setattr(serve_cli, "_prepare_state", prepare)
    code, err = run_main(["serve", "somewhere", "--port", "1"], capsys)
    assert code == 2 and err.strip().endswith("stop here"), err
    assert seen and seen[0] is not threading.main_thread()
    assert not seen[0].is_alive()
