"""Adapters in memory (torch): the authors' dense form (:mod:`.dense`) and the compact engine form
(:mod:`.compact`). Both load only after :mod:`flylora_runtime.format.checkpoint` has validated the files.
"""
