"""A cold adapter's load, offline, in the engine's slot layout: layer by layer, the whole adapter at once, and rebased.

Usage: ``python -m flylora_runtime.bench.load [--rounds N] [--threads N] [--slots N] [--json PATH]``

What a bf16 CPU engine does with an adapter the gateway stored with its engine form (docs/KERNELS.md), without
vLLM: one rank-32, k=8 adapter of all seven projections of the demo model (``make model``), generated into a
temporary folder with its engine form, loaded into 120 slot sets (30 layers x ``qkv``, ``o``, ``gate_up``,
``down``; packed compact bf16 A, 16-bit indices, bf16 B, as the plugin allocates them):

- ``read``: :func:`~flylora_runtime.weights.engine_form.read_engine_form` (map, check the values, 630 views);
- ``images``: the 120 slot images (``pack_at_write``, as the engine makes them);
- ``first write``: the images into a slot for the first time (copy plans made then);
- ``re-activation``: the same images into another slot (what a cached adapter's next activation costs).

Three ways, in a rotating order every round, on fresh reads: ``per layer`` (``prepare_slot`` and ``write_slot`` for
each layer, the engine before 2026-12-06 22:20), ``whole adapter`` (``prepare_slots`` and ``write_slots``, one
count pass and two C calls for all layers: the engine's first adapter of a shape) and ``template`` (an
:class:`~flylora_runtime.kernels.adapter_template.AdapterTemplate` made once from the adapter's first read, rebased
on each fresh read: its ``images`` step is ``instantiate``, what the engine runs for every later adapter of the
shape). Prints medians and minimums (ms) and checks that the three leave the same slots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
PREFIX = "base_model.model.model.layers.{layer}.{module}"


def _adapter_folder(tmp: Path) -> Path:
    from flylora_runtime.format.engine_form import ENGINE_FORM_NAME, write_engine_form
    from flylora_runtime.format.modelspec import BaseModelSpec
    from flylora_runtime.paths import demo_model_dir
    from flylora_runtime.training.random_adapters import GenerateSpec, generate_adapter

    model = demo_model_dir()
    if not (model / "config.json").is_file():
        sys.exit(f"no demo model at {model}: run `make model` first")
    base = BaseModelSpec.from_pretrained(model)
    folder = tmp / "adapter"
    adapter = generate_adapter(base, GenerateSpec(r=32, top_k=8, seed=0))
    adapter.save(folder)
    write_engine_form(folder / "adapter_model.safetensors", folder / ENGINE_FORM_NAME, adapter.config.scaling)
    return folder


def _jobs(tensors: dict, slots: dict) -> list:
    from flylora_runtime.reference.ops import LayerAdapter

    jobs = []
    for (layer, group), sl in slots.items():
        per = []
        for module in GROUPS[group]:
            p = PREFIX.format(layer=layer, module=module)
            per.append(LayerAdapter(A=tensors[p + ".lora_A.weight"], B=tensors[p + ".lora_B.weight"],
                                    d=tensors[p + ".lora_topk_bias"], top_k=8, scaling=1.0))
        jobs.append((sl, per))
    return jobs


def _slot(slots, s: int) -> list[torch.Tensor]:
    """Everything slot ``s`` of ``slots`` holds."""
    out = [getattr(slots, name)[s] for name in ("a_val", "a_idx", "a_mask", "a_nnz", "d", "k", "r", "magnitude")]
    return out + [slots.b_view(i)[s] for i in range(slots.num_slices)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds per way (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    parser.add_argument("--slots", type=int, default=64,
                        help="slots per layer (default 64, the engine's here; at least 7: slots 1-6 are written)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.slots < 7 or args.rounds < 1:
        parser.error("need --slots >= 7 and --rounds >= 1")
    torch.set_num_threads(args.threads)

    from flylora_runtime.kernels import (allocate_slots, native, plan_writes, prepare_slot, prepare_slots, write_slot,
                                         write_slots)
    from flylora_runtime.kernels.adapter_template import AdapterTemplate
    from flylora_runtime.weights.engine_form import read_engine_form

    if native.library() is None:
        sys.exit("the compiled CPU kernel is unavailable (no C compiler?): nothing to measure")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(_adapter_folder(Path(tmp)))
        tensors, _ = read_engine_form(folder)
        slots = {}
        for layer in range(30):
            for group, modules in GROUPS.items():
                p = PREFIX.format(layer=layer, module=modules[0])
                n_in = tensors[p + ".lora_A.weight"].shape[1]
                outs = [tensors[PREFIX.format(layer=layer, module=m) + ".lora_B.weight"].shape[0] for m in modules]
                slots[(layer, group)] = allocate_slots(
                    args.slots, 32, n_in, outs, b_dtype=torch.bfloat16, max_nnz=n_in, packed=True,
                    index_dtype=torch.int16, a_dtype=torch.bfloat16, max_top_k=8)
        steps = ("read", "images", "first write", "re-activation")
        ways = ("per layer", "whole adapter", "template")
        first = read_engine_form(folder)[0]
        first_jobs = _jobs(first, slots)
        first_images = prepare_slots(first_jobs, check_finite=False, pack_at_write=True)
        template = AdapterTemplate.from_plan(plan_writes([(sl, im) for (sl, _), im in zip(first_jobs, first_images)]),
                                             first.mapping)
        del first, first_jobs, first_images
        times = {way: {step: [] for step in steps} for way in ways}
        for rnd in range(args.rounds + 2):  # two warm-up rounds
            for way in ways[rnd % 3:] + ways[:rnd % 3]:
                t0 = time.perf_counter()
                tensors, _ = read_engine_form(folder)
                t1 = time.perf_counter()
                jobs = _jobs(tensors, slots) if way != "template" else None
                t2 = time.perf_counter()
                if way == "template":
                    write = template.instantiate(tensors.mapping)
                    t3 = time.perf_counter()
                    write.write(5)
                    t4 = time.perf_counter()
                    write.write(6)
                elif way == "per layer":
                    images = [prepare_slot(sl, per, check_finite=False, pack_at_write=True) for sl, per in jobs]
                    t3 = time.perf_counter()
                    for (sl, _), im in zip(jobs, images):
                        write_slot(sl, 1, im)
                    t4 = time.perf_counter()
                    for (sl, _), im in zip(jobs, images):
                        write_slot(sl, 2, im)
                else:
                    images = prepare_slots(jobs, check_finite=False, pack_at_write=True)
                    t3 = time.perf_counter()
                    pairs = [(sl, im) for (sl, _), im in zip(jobs, images)]
                    plan = write_slots(pairs, 3)
                    t4 = time.perf_counter()
                    write_slots(pairs, 4, plan)
                t5 = time.perf_counter()
                if rnd >= 2:
                    for step, dt in zip(steps, (t1 - t0, t3 - t2, t4 - t3, t5 - t4)):
                        times[way][step].append(dt * 1e3)
        same = all(torch.equal(x, y) for sl in slots.values() for s in (3, 5)
                   for x, y in zip(_slot(sl, 1), _slot(sl, s)))
    result = {way: {step: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3)}
                    for step, v in per.items()} for way, per in times.items()}
    print(f"one rank-32 all-projection adapter of the demo model, 120 layers, {args.slots} slots, "
          f"{args.threads} threads, {args.rounds} rounds (ms, median / min)")
    print(f"{'step':<15}" + "".join(f"{w:>20}" for w in ways))
    for step in steps:
        cells = [f"{result[w][step]['median_ms']:.2f} / {result[w][step]['min_ms']:.2f}" for w in ways]
        print(f"{step:<15}" + "".join(f"{c:>20}" for c in cells))
    print("slots written the three ways are identical:", same)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "slots": args.slots, "rounds": args.rounds,
                                         "identical": same, "results": result}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
