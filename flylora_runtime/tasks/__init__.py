"""Moved to :mod:`flylora_runtime.demo.tasks`; only the old ``python -m flylora_runtime.tasks.evaluate`` path is kept here."""
