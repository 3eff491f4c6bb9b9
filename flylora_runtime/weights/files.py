"""Writing adapter files so that a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(final_path: str, writer: Callable[[str], None]) -> None:
    """``writer(tmp)`` writes a temporary file in ``final_path``'s directory; it is fsynced, then renamed over
    ``final_path`` (atomic on POSIX). On any failure the temporary file is removed and ``final_path`` is left
    as it was."""
    directory = os.path.dirname(final_path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """``text`` into ``path`` as UTF-8 (a ``writer`` for :func:`atomic_write`)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
