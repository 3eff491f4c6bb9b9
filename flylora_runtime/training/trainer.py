"""Train a FlyLoRA adapter on a ``transformers`` model with the authors' semantics, on CPU.

What is trained and how (docs/FLYLORA.md, read off the authors' PEFT fork):

- every targeted ``nn.Linear`` gets a frozen sparse ``A`` (``init_lora_weights = "sparse"``, see
  :func:`flylora_runtime.training.random_adapters.sparse_A`), a trainable ``B`` initialised to zero and a routing bias
  ``d`` (a buffer, zeros at start);
- forward: ``y = A x``; the ``top_k`` largest *signed* ``y + d`` fire; ``out = W x + (alpha / r) * B (y * m)``;
- after each forward call, ``d += bias_u * sign(mean(c) - c)`` where ``c[j]`` counts the tokens of that
  call that selected rank ``j`` (under-used ranks are pushed up, over-used ones down). As in the authors'
  code this happens on every forward call of the training layer, gradients or not;
- only ``B`` gets gradients; the loss is next-token cross-entropy on the assistant's tokens only.

Examples are chat conversations, one JSON object per line: ``{"messages": [{"role": "user", ...},
{"role": "assistant", ...}]}``. The result is saved in the authors' checkpoint layout
(:meth:`flylora_runtime.weights.dense.FlyLoRAAdapter.save`).

    python -m flylora_runtime.training.trainer --task json-reply --out /tmp/json-reply
    python -m flylora_runtime.training.trainer --data train.jsonl --out /tmp/mine --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from flylora_runtime.weights.dense import FlyLoRAAdapter, ModuleWeights
from flylora_runtime.format.config import KNOWN_PROJECTIONS, ROUTINGS, FlyLoRAConfig
from flylora_runtime.training.random_adapters import sparse_A
from flylora_runtime.format.modelspec import PARENT


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (the paper's adapter configuration by default).

    Attributes:
        r: rank. top_k: ranks that fire per token. lora_alpha: scaling numerator (delta scaled by alpha/r).
        bias_u: the routing-bias update rate of the authors' rule. routing: "signed" (authors) or "magnitude".
        targets: projection names to adapt.
        steps: optimizer steps. batch_size: examples per step. lr: AdamW learning rate for B.
        warmup: linear warm-up steps. weight_decay: AdamW weight decay. max_len: examples are cut to this many
        tokens.
        bf16: run the frozen base model's matmuls under CPU bf16 autocast (measured no faster on this project's
        CPU machine, so off by default); the FlyLoRA branch (``A x``, the top-k, ``B``) and the loss stay fp32, B's optimizer
        state is fp32. False: everything fp32.
        share_prefix: run the prompt prefix every example shares (the chat template's system prompt) once
        per step instead of once per row (same loss, same bias updates; see :func:`reply_loss`).
        seed: seeds A, the data order and everything else random.
    """

    r: int = 32
    top_k: int = 8
    lora_alpha: float = 64.0
    bias_u: float = 0.001
    routing: str = "signed"
    targets: tuple[str, ...] = KNOWN_PROJECTIONS
    steps: int = 60
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 5
    weight_decay: float = 0.0
    max_len: int = 128
    bf16: bool = False
    share_prefix: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.r <= 0 or not 0 < self.top_k <= self.r:
            raise ValueError(f"need r > 0 and 0 < top_k <= r, got r={self.r}, top_k={self.top_k}")
        if self.r % self.top_k:
            raise ValueError(f"the sparse init needs top_k to divide r, got r={self.r}, top_k={self.top_k}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        unknown = [t for t in self.targets if t not in KNOWN_PROJECTIONS]
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {KNOWN_PROJECTIONS}, got {self.targets}")
        for name in ("steps", "batch_size", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")

    def to_json(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out


class FlyLoRATrainLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one trainable FlyLoRA branch (the authors' training layer).

    Buffers/parameters: ``A`` ``[r, in]`` (buffer, frozen), ``B`` ``[out, r]`` (parameter, zeros at init),
    ``d`` ``[r]`` (buffer, updated by every forward call while ``update_bias`` is true).

    Semantics of one forward call on ``x`` ``[..., in]``::

        y    = x @ A.T                                  # [..., r]
        sel  = topk(y + d, top_k).indices               # signed (or |y + d| for routing="magnitude")
        m    = one_hot(sel)
        out  = x @ W.T + b + (alpha / r) * (y * m) @ B.T
        c    = m.sum(all token dims)                    # [r], tokens per rank in this call
        d   += bias_u * sign(mean(c) - c)               # after the output is computed
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, *, top_k: int, scaling: float, bias_u: float,
                 routing: str = "signed"):
        super().__init__()
        r = A.shape[0]
        self.base = base
        self.register_buffer("A", A.to(torch.float32).contiguous())
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.register_buffer("d", torch.zeros(r))
        self.top_k, self.scaling, self.bias_u, self.routing = top_k, scaling, bias_u, routing
        self.update_bias = True
        #: while not None, counts are added here (times ``pending_weight``) instead of updating ``d``:
        #: see :func:`shared_prefix`, which splits one logical forward call into two.
        self.pending: torch.Tensor | None = None
        self.pending_weight = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        with torch.autocast(x.device.type, enabled=False):
            return self._add_branch(out, x.float())

    def _add_branch(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.A.T
        with torch.no_grad():
            score = y + self.d
            if self.routing == "magnitude":
                score = score.abs()
            sel = torch.topk(score, self.top_k, dim=-1).indices
            mask = torch.zeros_like(y).scatter_(-1, sel, 1.0)
        out = out + self.scaling * ((y * mask) @ self.B.T)
        if self.update_bias:
            with torch.no_grad():
                c = mask.reshape(-1, mask.shape[-1]).sum(0)
                if self.pending is not None:
                    self.pending += c * self.pending_weight
                else:
                    self.apply_bias_update(c)
        return out

    @torch.no_grad()
    def apply_bias_update(self, c: torch.Tensor) -> None:
        """``d += bias_u * sign(mean(c) - c)``: the authors' rule for per-rank selection counts ``c``."""
        self.d += self.bias_u * torch.sign(c.mean() - c)


def attach_trainable(model: nn.Module, cfg: TrainConfig, gen: torch.Generator) -> dict[str, FlyLoRATrainLinear]:
    """Freeze ``model`` and replace every targeted projection by a :class:`FlyLoRATrainLinear`.

    Returns module path -> layer, in model order (A is drawn in that order from ``gen``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, FlyLoRATrainLinear] = {}
    for path, module in list(model.named_modules()):
        proj = path.rsplit(".", 1)[-1]
        if proj not in cfg.targets or not isinstance(module, nn.Linear) or f".{PARENT[proj]}." not in f".{path}":
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0])
        A = sparse_A(cfg.r, cfg.top_k, module.in_features, gen)
        layer = FlyLoRATrainLinear(module, A, top_k=cfg.top_k, scaling=cfg.lora_alpha / cfg.r, bias_u=cfg.bias_u,
                                   routing=cfg.routing)
        setattr(parent, proj, layer)
        layers[path] = layer
    if not layers:
        raise ValueError(f"no module of the model matches targets {cfg.targets}")
    return layers


def detach_trainable(model: nn.Module, layers: dict[str, FlyLoRATrainLinear]) -> None:
    """Put the original linear layers back."""
    for path, layer in layers.items():
        parent_path, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), attr, layer.base)


def to_adapter(layers: dict[str, FlyLoRATrainLinear], cfg: TrainConfig, base_name: str | None) -> FlyLoRAAdapter:
    """The trained layers as a :class:`FlyLoRAAdapter` with the authors' config fields."""
    raw = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(cfg.targets), "inference_mode": True,
        "top_k": cfg.top_k, "bias_u": cfg.bias_u, "init_lora_weights": "sparse",
    }
    if cfg.routing != "signed":
        raw["flylora_routing"] = cfg.routing
    modules = {path: ModuleWeights(A=l.A.detach().clone(), B=l.B.detach().clone(), d=l.d.detach().clone())
               for path, l in layers.items()}
    return FlyLoRAAdapter(config=FlyLoRAConfig.from_dict(raw), modules=modules)


# --------------------------------------------------------------------------------------------- data

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Chat examples, one ``{"messages": [...]}`` object per line; the last message is the assistant's."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{n}: expected {{'messages': [..., {{'role': 'assistant', ...}}]}}")
            out.append(obj)
    return out


def encode(tokenizer, messages: Sequence[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that are -100 except on the assistant's reply
    (its text and the end-of-turn token), using the model's chat template as the server will."""
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=True)
    prompt, full = _ids(prompt), _ids(full)
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template does not extend the prompt with the reply; cannot mask the prompt")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # keep the reply and its end-of-turn token; drop what the template adds after it (a newline)
    if end in full[len(prompt):]:
        full = full[:len(prompt) + full[len(prompt):].index(end) + 1]
    full = full[:max_len]
    labels = [-100] * len(prompt) + full[len(prompt):]
    return full, labels[:len(full)]


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        att[i, :len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": att}


# --------------------------------------------------------------------------------------------- loop

@dataclass
class TrainResult:
    """What a run produced: the adapter, the loss per step and the wall time in seconds."""

    adapter: FlyLoRAAdapter
    losses: list[float]
    seconds: float


def train(model: nn.Module, tokenizer, examples: Sequence[dict], cfg: TrainConfig, *, base_name: str | None = None,
          progress: bool = True) -> TrainResult:
    """Train one adapter on ``model`` (modified in place while training, restored afterwards)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    encoded = [encode(tokenizer, ex["messages"], cfg.max_len) for ex in examples]
    if not encoded:
        raise ValueError("no training examples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = common_prefix_len(encoded) if cfg.share_prefix else 0
    layers = attach_trainable(model, cfg, gen)
    try:
        model.train()
        params = [l.B for l in layers.values()]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
        order: list[int] = []
        losses: list[float] = []
        bar = _progress(cfg.steps, progress)
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            if len(order) < cfg.batch_size:
                perm = list(range(len(encoded)))
                rng.shuffle(perm)
                order.extend(perm)
            batch = [encoded[i] for i in order[:cfg.batch_size]]
            del order[:cfg.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = reply_loss(model, collate(batch, pad), layers, prefix)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        seconds = time.perf_counter() - t0
        adapter = to_adapter(layers, cfg, base_name)
    finally:
        detach_trainable(model, layers)
        model.eval()
    return TrainResult(adapter=adapter, losses=losses, seconds=seconds)


def reply_loss(model: nn.Module, batch: dict[str, torch.Tensor], layers: dict[str, FlyLoRATrainLinear] | None = None,
               prefix_len: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (reply) tokens, in fp32.

    Same value as ``model(**batch).loss``, computed with less work:

    - the output head runs only at the positions that predict a labelled token (the reply is short and the
      vocabulary is 49k);
    - with ``prefix_len = P > 0`` (the first P tokens are identical in every row and unlabelled, e.g. the
      chat template's system prompt) those P tokens run once, not once per row, and the rows continue from
      their KV cache. The training layers' bias update stays exactly the authors' one-call rule: the
      prefix's rank counts are weighted by the batch size and added to the rest's before ``d`` moves once.
    """
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if prefix_len <= 0:
        hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
        return _head_loss(model, hidden, labels)
    rows = ids.shape[0]
    if (labels[:, :prefix_len + 1] != -100).any() or not (ids[:, :prefix_len] == ids[:1, :prefix_len]).all():
        raise ValueError("the shared prefix must be identical in every row and contain no labelled token")
    layers = layers or {}
    for l in layers.values():
        l.pending = torch.zeros_like(l.d)
    try:
        for l in layers.values():
            l.pending_weight = rows
        pre = model.model(input_ids=ids[:1, :prefix_len], use_cache=True)
        cache = pre.past_key_values
        cache.batch_repeat_interleave(rows)
        for l in layers.values():
            l.pending_weight = 1
        hidden = model.model(input_ids=ids[:, prefix_len:], attention_mask=att, past_key_values=cache,
                             use_cache=True).last_hidden_state
        for l in layers.values():
            if l.update_bias:
                l.apply_bias_update(l.pending)
    finally:
        for l in layers.values():
            l.pending, l.pending_weight = None, 1
    return _head_loss(model, hidden, labels[:, prefix_len:])


def _head_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    keep = targets != -100
    h = hidden[:, :-1][keep]
    with torch.autocast("cpu", enabled=False):
        return nn.functional.cross_entropy(model.lm_head(h.float()), targets[keep])


def common_prefix_len(encoded: Sequence[tuple[list[int], list[int]]]) -> int:
    """Tokens every example shares at its start, stopping one token before the earliest labelled token (so
    each row's first reply token is predicted from the per-row part)."""
    limit = min(next((i for i, y in enumerate(lab) if y != -100), len(lab)) for _, lab in encoded) - 1
    first = encoded[0][0]
    n = 0
    while n < limit and all(ids[n] == first[n] for ids, _ in encoded):
        n += 1
    return n


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, file=sys.stderr)


def load_model(model_dir: str | os.PathLike):
    """The base model (fp32, CPU) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tok


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flylora-train", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a built-in demo task (see flylora_runtime.demo.tasks)")
    src.add_argument("--data", help="a JSONL file of chat examples")
    p.add_argument("--out", required=True, help="output adapter directory (PEFT layout)")
    p.add_argument("--base", default=None, help="base model directory (default: the demo model)")
    p.add_argument("--base-name", default="SmolLM2-135M-Instruct", help="base_model_name_or_path in the config")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared machine)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "targets":
            p.add_argument(flag, default=",".join(defaults.targets), help="comma-separated projection names")
        elif f.name == "share_prefix":
            p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                           help="run every row's full prompt (see TrainConfig.share_prefix)")
        elif f.name == "bf16":
            p.add_argument("--bf16", action="store_true", help="bf16 autocast for the frozen base (see TrainConfig.bf16)")
        else:
            p.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                           help=f"(default {getattr(defaults, f.name)})")
    return p


def _config_from_args(args) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    kw["targets"] = tuple(t.strip() for t in kw["targets"].split(",") if t.strip())
    return TrainConfig(**kw)


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    from flylora_runtime.paths import demo_model_dir

    try:
        cfg = _config_from_args(args)
        if args.task:
            from flylora_runtime.demo.tasks import get_task

            examples = [ex.chat() for ex in get_task(args.task).train()]
        else:
            examples = read_jsonl(args.data)
    except (ValueError, KeyError, OSError) as exc:
        print(f"flylora-train: error: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        examples = examples[:args.limit]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.base or demo_model_dir())
    result = train(model, tok, examples, cfg, base_name=args.base_name, progress=not args.quiet)
    result.adapter.save(args.out)
    Path(args.out, "training.json").write_text(json.dumps(
        {"config": cfg.to_json(), "examples": len(examples), "seconds": round(result.seconds, 1),
         "loss_first": result.losses[0], "loss_last": result.losses[-1],
         "loadavg": os.getloadavg()}, indent=2) + "\n")
    print(f"trained {args.task or args.data}: {cfg.steps} steps in {result.seconds:.0f} s, "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
