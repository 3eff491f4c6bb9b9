"""The engine's vLLM command line and its model argument handling (no engine started)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants

from flylora_runtime.engine import launcher
from flylora_runtime.engine.launcher import EngineConfig, build_parser, command, main
from flylora_runtime.format.modelspec import PARENT


def test_vllm_wraps_only_the_projections_adapters_may_target(tmp_path) -> None:
    """Without ``--lora-target-modules`` vLLM also wraps lm_head and embed_tokens and runs a LoRA pass over
    the vocabulary every step; adapters can only target the seven projections the validator accepts."""
    argv = EngineConfig(model=str(tmp_path), adapter_store=str(tmp_path / "store")).vllm_argv()
    i = argv.index("--lora-target-modules")
    targets = []
    for arg in argv[i + 1:]:
        if arg.startswith("--"):
            break
        targets.append(arg)
    assert sorted(targets) == sorted(PARENT) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert "lm_head" not in argv and "embed_tokens" not in argv


# --- your own model: folders, Hugging Face ids, offline by default ------------------------------------------

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({  # a small Llama: the engine sizes its adapter slots from it
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "torch_dtype": "bfloat16"}))
    return path


def _config(argv: list[str]) -> EngineConfig:
    """What ``flylora-engine <argv>`` builds."""
    return EngineConfig(**vars(build_parser().parse_args(argv)))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test (the hub library reads this attribute at each call)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("FLYLORA_ENGINE_ONLINE", raising=False)
    return cache


def _cached(cache: Path, model_id: str, revision: str = "main") -> Path:
    """Put ``model_id`` into ``cache`` the way huggingface_hub lays it out (refs/<revision> -> snapshots/<sha>)."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(SNAPSHOT)
    return _folder(repo / "snapshots" / SNAPSHOT)


def test_a_local_folder_is_served_offline_under_its_own_name(tmp_path, hub_cache, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the engine's setting wins over the shell's
    model = _folder(tmp_path / "my-llama")
    config = _config(["--model", str(model), "--adapter-store", str(tmp_path / "store")])
    assert config.online is False and config.served_model_name == "my-llama"
    argv, env = command(config)
    assert argv[argv.index("--model") + 1] == str(model)
    assert argv[argv.index("--served-model-name") + 1] == "my-llama"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["FLYLORA_BASE_MODEL_DIR"] == str(model)  # the plugin validates adapters against its config.json


def test_served_model_name_given_wins(tmp_path, hub_cache) -> None:
    model = _folder(tmp_path / "my-llama")
    assert _config(["--model", str(model), "--served-model-name", "llama-8b"]).served_model_name == "llama-8b"


def test_a_model_id_not_in_the_cache_needs_online(tmp_path, hub_cache, capsys) -> None:
    config = _config(["--model", "acme/llama-8b", "--adapter-store", str(tmp_path / "store")])
    with pytest.raises(ValueError, match="not in the local Hugging Face cache.*--online.*FLYLORA_ENGINE_ONLINE"):
        config.validate()
    assert main(["--model", "acme/llama-8b", "--adapter-store", str(tmp_path / "store")]) == 2
    assert "--online" in capsys.readouterr().err


def test_a_model_id_in_the_local_cache_is_served_offline(tmp_path, hub_cache) -> None:
    snapshot = _cached(hub_cache, "acme/llama-8b")
    config = _config(["--model", "acme/llama-8b", "--adapter-store", str(tmp_path / "store")])
    argv, env = command(config)
    assert argv[argv.index("--model") + 1] == "acme/llama-8b"  # vLLM reads it from the cache
    assert config.served_model_name == "acme/llama-8b"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["FLYLORA_BASE_MODEL_DIR"] == str(snapshot)


def test_online_from_the_environment_or_the_flag_and_no_online_wins(tmp_path, hub_cache, monkeypatch) -> None:
    snapshot = _cached(hub_cache, "acme/llama-8b")  # cached: nothing is downloaded
    store = str(tmp_path / "store")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # inherited from the shell: --online must still go online
    monkeypatch.setenv("FLYLORA_ENGINE_ONLINE", "1")
    config = _config(["--model", "acme/llama-8b", "--adapter-store", store])
    assert config.online is True
    _, env = command(config)
    assert env["HF_HUB_OFFLINE"] == "0" and env["TRANSFORMERS_OFFLINE"] == "0"
    assert env["FLYLORA_BASE_MODEL_DIR"] == str(snapshot)
    assert _config(["--model", "acme/llama-8b", "--no-online"]).online is False
    monkeypatch.setenv("FLYLORA_ENGINE_ONLINE", "0")
    assert _config(["--model", "acme/llama-8b"]).online is False
    assert _config(["--model", "acme/llama-8b", "--online"]).online is True


def test_a_bad_online_value_is_refused_by_name(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLYLORA_ENGINE_ONLINE", "maybe")
    assert main(["--help"]) == 2
    assert "FLYLORA_ENGINE_ONLINE must be one of" in capsys.readouterr().err


def test_online_fetches_the_config_first_for_adapter_validation(tmp_path, hub_cache, monkeypatch) -> None:
    """Online and not cached: only config.json is fetched before vLLM starts (vLLM downloads the weights into
    the same cache). The download function is replaced here: this machine has no route to Hugging Face."""
    fetched = []

    def fake_download(repo_id, filename, revision=None):
        fetched.append((repo_id, filename, revision))
        return str(_cached(hub_cache, repo_id, revision or "main") / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    config = _config(["--model", "acme/llama-8b", "--online", "--revision", "v2", "--adapter-store",
                      str(tmp_path / "store")])
    argv, env = command(config)
    assert fetched == [("acme/llama-8b", "config.json", "v2")]
    assert argv[argv.index("--revision") + 1] == "v2"
    assert Path(env["FLYLORA_BASE_MODEL_DIR"], "config.json").is_file()


def test_an_unreachable_hub_is_a_clear_error(tmp_path, hub_cache, monkeypatch) -> None:
    def unreachable(repo_id, filename, revision=None):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    config = _config(["--model", "acme/llama-8b", "--online", "--adapter-store", str(tmp_path / "store")])
    with pytest.raises(ValueError, match="cannot fetch acme/llama-8b's config.json.*connection refused"):
        command(config)


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/folder"], "neither a folder nor a Hugging Face model id"),
    (["--model", "{model}", "--revision", "v1"], "revision applies to a Hugging Face model id"),
    (["--model", "{model}", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in"),
    (["--model", "{empty}"], "config.json is missing"),
])
def test_bad_model_arguments_say_what_is_wrong(tmp_path, hub_cache, capsys, argv, message) -> None:
    model = _folder(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    argv = [a.format(model=model, empty=tmp_path / "empty") for a in argv]
    assert main([*argv, "--adapter-store", str(tmp_path / "store")]) == 2
    assert message in capsys.readouterr().err


def test_memory_flags_reach_vllm(tmp_path) -> None:
    argv = _config(["--model", str(_folder(tmp_path / "m")), "--gpu-memory-utilization", "0.85",
                    "--max-model-len", "8192", "--max-loras", "8", "--max-lora-rank", "64",
                    "--dtype", "bfloat16"]).vllm_argv()
    pairs = dict(zip(argv, argv[1:]))
    assert (pairs["--gpu-memory-utilization"], pairs["--max-model-len"], pairs["--max-loras"],
            pairs["--max-lora-rank"], pairs["--dtype"]) == ("0.85", "8192", "8", "64", "bfloat16")
    assert launcher.HUB_ID.fullmatch("meta-llama/Llama-3.1-8B-Instruct")
