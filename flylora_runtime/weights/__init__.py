"""Adapters in memory (torch): the authors' dense form (:mod:`.dense`) and the compact engine form
(:mod:`.compact`). Both load only after :mod:`flylora_runtime.format.checkpoint` has validated the files.
:mod:`.packing` decides which entries of A are kept and packs them (shared with the kernels' slots);
:mod:`.files` writes files atomically.
"""
