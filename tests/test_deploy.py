"""The deploy recipe: the Dockerfile runs the install script CI runs, and the Grafana dashboard
queries only metrics the server exports."""

import json
import re
from pathlib import Path

from bitserve.server.metrics import create_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_uses_the_tested_install_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "deploy/install.sh" in dockerfile
    assert "deploy/install.sh" in (ROOT / "Makefile").read_text()
    for copied in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        assert (ROOT / copied).exists(), copied


def test_dashboard_metrics_exist() -> None:
    exported = {s.name for family in create_metrics("m").registry.collect() for s in family.samples}
    dash = json.loads((ROOT / "deploy/grafana/dashboards/bitserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"bitserve_[a-z0-9_]+", e)}
    assert used and used <= exported, used - exported
