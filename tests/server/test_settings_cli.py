"""Settings defaults and overrides (environment, file), the CLI's admin key, and the torch-free rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli import build_parser, load_settings
from server.settings import REPO_ROOT, Settings

ENV_KEYS = ("FLYLORA_DATA_DIR", "FLYLORA_DATABASE_URL", "FLYLORA_ADAPTER_STORE", "FLYLORA_ENGINE_URLS",
            "FLYLORA_ADMIN_KEY", "FLYLORA_BASE_MODEL_DIR", "FLYLORA_BASE_MODEL_ID", "FLYLORA_GATEWAY_PORT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)


def test_defaults_follow_the_shared_conventions():
    s = Settings(_env_file=None)
    data = REPO_ROOT / ".work"
    assert REPO_ROOT == Path(__file__).resolve().parents[2]
    assert s.data_dir == data
    assert s.db_url == f"sqlite:///{data / 'registry.db'}"
    assert s.store_dir == data / "adapters"
    assert s.base_model_id == "SmolLM2-135M-Instruct"
    assert s.base_dir == data / "models" / "SmolLM2-135M-Instruct"
    assert s.engine_urls == ["http://127.0.0.1:8100"]
    assert (s.gateway_host, s.gateway_port, s.admin_key) == ("127.0.0.1", 8000, None)
    assert s.max_upload_bytes == 1 << 30 and s.max_tokens_cap == 4096 and s.max_concurrency_per_tenant == 16


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYLORA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FLYLORA_ENGINE_URLS", "http://a:1, http://b:2/")
    monkeypatch.setenv("FLYLORA_ADMIN_KEY", "k" * 16 + "0123456789abcdef")
    s = Settings(_env_file=None)
    assert s.store_dir == tmp_path / "adapters" and s.db_url == f"sqlite:///{tmp_path / 'registry.db'}"
    assert s.engine_urls == ["http://a:1", "http://b:2"]
    assert s.admin_key.get_secret_value() == "k" * 16 + "0123456789abcdef"


def test_env_file_is_read_and_environment_wins(monkeypatch, tmp_path):
    env = tmp_path / "gw.env"
    env.write_text("FLYLORA_GATEWAY_PORT=9001\nFLYLORA_DATABASE_URL=postgresql://db/x\nFLYLORA_MAX_N=4\n")
    monkeypatch.setenv("FLYLORA_MAX_N", "5")
    s = Settings(_env_file=env)
    assert (s.gateway_port, s.db_url, s.max_n) == (9001, "postgresql://db/x", 5)


@pytest.mark.parametrize("field,value,match", [
    ("engine_urls", "ftp://x", "http"), ("engine_urls", " , ", "at least one"),
    ("max_concurrency_per_tenant", 0, "greater than"), ("base_model_id", "fl-abc", "fl-"),
])
def test_invalid_values_name_the_value(field, value, match):
    with pytest.raises(ValidationError, match=match):
        Settings(_env_file=None, **{field: value})


def test_cli_generates_and_prints_an_admin_key_once(capsys, tmp_path):
    args = build_parser().parse_args(["--port", "0"])
    s = load_settings(args)
    key = s.admin_key.get_secret_value()
    err = capsys.readouterr().err
    assert key in err and err.count(key) == 1 and len(key) > 40
    assert s.gateway_port == 0


def test_cli_keeps_a_configured_admin_key(monkeypatch, capsys):
    key = "set-by-ops-" + "0123456789abcdef" * 2
    monkeypatch.setenv("FLYLORA_ADMIN_KEY", key)
    s = load_settings(build_parser().parse_args([]))
    assert s.admin_key.get_secret_value() == key and key not in capsys.readouterr().err


def test_server_never_imports_torch_or_vllm():
    code = ("import sys, server, server.app, server.cli; sys.exit(1 if any(m.split('.')[0] in ('torch', 'vllm') "
            "for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
