"""The bitserve command as a user runs it: real processes, real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from bitserve.cli import main


def bitserve(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "bitserve.cli", *args], capture_output=True, text=True, timeout=300
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "src", "llama")
    (root / "text.txt").write_text("\ufeff" + "The quick brown fox jumps over the lazy dog. " * 60)
    return root


def test_help_lists_every_command() -> None:
    out = bitserve("--help").stdout
    for cmd in ("fetch-default", "quantize", "eval", "generate", "inspect"):
        assert cmd in out
    assert "short" in bitserve("quantize", "--help").stdout  # documents the short last group


def test_every_option_of_every_command_says_what_it_does() -> None:
    """`bitserve COMMAND --help` explains each argument: none is listed without a help text."""
    import argparse

    from bitserve.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {' '.join(action.option_strings) or action.dest}"
        for name, parser in commands.choices.items()
        for action in parser._actions
        if not action.help and action.dest != "help"
    ]
    assert not bare, bare


def test_quantize_inspect_eval_generate(workdir: Path) -> None:
    ckpt = workdir / "w4"
    bitserve(
        "quantize", str(workdir / "src"), "--out", str(ckpt), "--bits", "4", "--group-size", "64"
    )
    info = bitserve("inspect", str(ckpt)).stdout
    assert "model.layers.1.mlp.down_proj" in info and "SHA-256 verified" in info
    manifest = json.loads(bitserve("inspect", str(ckpt), "--json").stdout)
    assert manifest["quantization"]["group_size"] == 64

    out = workdir / "ppl.json"
    args = ["--text", str(workdir / "text.txt"), "--seqlen", "64", "--max-windows", "5"]
    bitserve("eval", str(ckpt), *args, "--out", str(out), "--record")
    result = json.loads(out.read_text())
    assert result["windows"] == 5 and result["tokens"] == 5 * 63
    assert 1.0 < result["perplexity"] < 1000  # random-init, ~uniform over 97 tokens
    recorded = json.loads(bitserve("inspect", str(ckpt), "--json").stdout)["quality"]
    assert recorded["perplexity"] == pytest.approx(result["perplexity"])
    fp = json.loads(bitserve("eval", str(workdir / "src"), *args).stdout)
    assert fp["perplexity"] != result["perplexity"]

    text = bitserve("generate", str(ckpt), "--prompt", "abc", "--max-new-tokens", "8").stdout
    chat = bitserve(
        "generate", str(ckpt), "--prompt", "abc", "--chat", "--max-new-tokens", "8"
    ).stdout
    assert text.endswith("\n") and chat.endswith("\n")


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["quantize", "/nonexistent", "--out", "/tmp/x"],
            "/nonexistent: no such file or directory",
        ),
        (["eval", "/nonexistent", "--text", "/tmp/t"], "/tmp/t: no such text file"),
        (["generate", "/nonexistent", "--prompt", "x"], "/nonexistent: no such file or directory"),
        (["inspect", "/tmp"], "not a bitserve checkpoint"),
        (["quantize", "SRC", "--out", "OUT", "--method-arg", "oops"], "expects KEY=VALUE"),
        (["eval", "SRC", "--text", "/nonexistent.txt"], "/nonexistent.txt: no such text file"),
    ],
)
def test_errors_are_one_line(
    workdir: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.replace("SRC", str(workdir / "src")).replace("OUT", str(workdir / "o")) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitserve: error: ") and message in err
    assert err.count("\n") == 1


def test_error_exit_from_a_real_process() -> None:
    proc = bitserve("inspect", "/nonexistent", ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == "bitserve: error: /nonexistent: not a directory\n"
