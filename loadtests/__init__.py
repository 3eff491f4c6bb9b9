"""Load generator and benchmark scenarios for the FlyLoRA gateway (results as JSON + PNG).

    python -m loadtests.run engine      # issue 3's engine benchmark
    python -m loadtests.run all         # every table and plot of docs/BENCHMARKS.md

Modules: ``workload`` (popularity, prompts, lengths; pure), ``generator`` (the asyncio + httpx client),
``stack`` (engine + gateway children, tenant, adapters through the API), ``report`` (summaries, JSON, PNG),
``run`` (the scenarios).
"""
