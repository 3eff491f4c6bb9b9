"""Old ``python -m`` paths of commands that moved in the package regrouping: each still works and says what
replaced it. The shims (``train``, ``merge``, ``generate``, ``demo_model``, ``tasks.evaluate``) hold nothing
else and will go in a later release.
"""

from __future__ import annotations

import runpy
import sys


def forward(old: str, new: str, script: str) -> None:
    """Run module ``new`` as ``__main__`` after telling the user what replaced ``python -m old``."""
    print(f"note: `python -m {old}` moved: use `{script}` (or `python -m {new}`)", file=sys.stderr)
    runpy.run_module(new, run_name="__main__", alter_sys=True)
