"""The import contracts (``[tool.importlinter]`` in pyproject.toml), checked by import-linter.

- ``flylora_runtime.format`` imports no torch, vllm or transformers;
- ``flylora_runtime`` never imports ``server``;
- ``server`` imports no torch, vllm or transformers, also not through a ``flylora_runtime`` module it imports;
- the process manager and the gateway client import none of those, nor the engine launcher.

import-linter reads every import statement, those inside functions included, and follows indirect imports.
The contracts hold for this tree, and a copy of the tree with one violating import fails them (so the check
can fail). Importing a package also runs its ``__init__``, which the import graph does not model: a last test
imports the gateway's entry points in a fresh interpreter and looks at ``sys.modules``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = {
    "format-torch-free": "flylora_runtime.format imports no torch, vllm or transformers",
    "runtime-not-gateway": "flylora_runtime never imports server",
    "gateway-torch-free": "server imports no torch, vllm or transformers (nor any flylora_runtime module that does)",
    "process-client-light": "the process manager and the gateway client import no torch, vllm, transformers or "
                            "the engine launcher",
}
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> tuple[int, str]:
    """Run lint-imports on the packages under ``root`` with ``root/pyproject.toml``: (exit status, report)."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}  # wide: one line per contract verdict
    out = subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo", str(root / "pyproject.toml")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def verdicts(report: str) -> dict[str, str]:
    """contract id -> KEPT or BROKEN, from the report's summary lines."""
    found = {}
    for cid, name in CONTRACTS.items():
        m = re.search(re.escape(name) + r" (KEPT|BROKEN)", report)
        assert m, f"no verdict for {name!r} in:\n{report}"
        found[cid] = m.group(1)
    return found


def test_the_contracts_are_the_ones_pyproject_declares():
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert set(re.findall(r'^id = "([^"]+)"', text, re.M)) == set(CONTRACTS)


def test_the_tree_keeps_every_import_contract():
    status, report = lint_imports(REPO_ROOT)
    assert status == 0, report
    assert set(verdicts(report).values()) == {"KEPT"}, report


#: (file, code appended to it, contracts it must break, an import chain the report must show)
VIOLATIONS = {
    "torch-in-format": ("flylora_runtime/format/config.py", "import torch\n",
                        {"format-torch-free", "gateway-torch-free", "process-client-light"},  # the CLI validates with format
                        "flylora_runtime.format.config -> torch"),
    "runtime-imports-server": ("flylora_runtime/paths.py", "\n\ndef _settings():\n    from server import settings\n"
                               "    return settings\n", {"runtime-not-gateway"}, "flylora_runtime.paths -> server"),
    "gateway-reaches-vllm-through-the-launcher": (
        "server/stack.py", "\n\ndef _engine_config():\n    from flylora_runtime.engine.launcher import EngineConfig\n"
        "    return EngineConfig\n", {"gateway-torch-free"}, "server.stack -> flylora_runtime.engine.launcher"),
    "client-imports-the-launcher": ("flylora_runtime/client/__init__.py", "import flylora_runtime.engine.launcher\n",
                                    {"process-client-light", "gateway-torch-free"},
                                    "flylora_runtime.client -> flylora_runtime.engine.launcher"),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_a_violating_import_breaks_its_contract(tmp_path, case):
    """A copy of the tree with one bad import: lint-imports fails, names the contract and the import."""
    path, code, broken, chain = VIOLATIONS[case]
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for package in ("flylora_runtime", "server"):
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    status, report = lint_imports(tmp_path)
    assert status == 0, report  # the copy itself is clean
    with open(tmp_path / path, "a") as fh:
        fh.write(code)
    status, report = lint_imports(tmp_path)
    assert status == 1, report
    got = verdicts(report)
    assert {cid for cid, v in got.items() if v == "BROKEN"} == broken, report
    assert chain in report, report


def test_the_gateway_entry_points_load_no_torch_vllm_or_transformers():
    code = ("import sys, server.app, server.cli, server.stack, flylora_runtime.client, flylora_runtime.format.checkpoint;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'transformers'));"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
