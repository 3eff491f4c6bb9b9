"""Benchmarks: ``python -m flylora_runtime.bench.kernels`` (the backends against vLLM's LoRA ops), ``.step`` (the
compiled kernel on whole model steps), ``.load`` (a cold adapter's load into the slots), ``.gpu_check`` (the
Triton kernel on a GPU)."""
