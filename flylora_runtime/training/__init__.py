"""Making adapters: the trainer (:mod:`.trainer`), the authors' merge (:mod:`.merge`) and random adapters
for tests and benchmarks (:mod:`.random_adapters`).
"""
