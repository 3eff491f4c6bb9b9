"""The adapter store: validated adapter folders on disk, addressed by internal id, shared with the engine.

Layout (the engine's resolver reads the same)::

    <store>/fl-<32 hex>/adapter_config.json
    <store>/fl-<32 hex>/adapter_model.safetensors
    <store>/.tmp-<hex>/          uploads being received (never read by the engine)
    <store>/.trash-<hex>/        folders being removed

A folder appears under its id only complete: files are written into a staging folder inside the store,
fsynced, and the folder is renamed into place (``os.rename`` is atomic within one file system). Removal
renames first, then deletes, so the engine never sees half a folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from flylora_runtime.format.checkpoint import CONFIG_NAME, WEIGHTS_NAME

from server.security import INTERNAL_ID_RE

log = logging.getLogger("flylora.gateway.store")

STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Folders of validated adapters under ``root``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, internal_id: str) -> Path:
        """The folder of an adapter; ``ValueError`` for anything that is not an internal id."""
        if not INTERNAL_ID_RE.fullmatch(internal_id):
            raise ValueError(f"expected an internal id fl-<32 hex>, found {internal_id!r}")
        return self.root / internal_id

    def new_staging(self) -> Path:
        """A fresh, empty staging folder inside the store (same file system, so the final rename is atomic)."""
        staging = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir(mode=0o750)
        return staging

    @staticmethod
    def staged_files(staging: Path) -> tuple[Path, Path]:
        """Where an upload's config and weights are written in a staging folder."""
        return staging / CONFIG_NAME, staging / WEIGHTS_NAME

    def commit(self, staging: Path, internal_id: str) -> Path:
        """fsync the staged files and rename the folder to its id. Blocking: run off the event loop."""
        final = self.path(internal_id)
        for f in self.staged_files(staging):
            _fsync_path(f)
        _fsync_path(staging, directory=True)
        if final.exists():
            raise FileExistsError(final)
        os.rename(staging, final)
        _fsync_path(self.root, directory=True)
        return final

    def discard(self, folder: Path) -> None:
        """Remove a staging (or any) folder of the store; missing is fine."""
        shutil.rmtree(folder, ignore_errors=True)

    def remove(self, internal_id: str) -> bool:
        """Remove an adapter's folder (rename away, then delete); False when it was not there."""
        src = self.path(internal_id)
        trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(src, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def ids(self) -> set[str]:
        """Internal ids with a folder in the store."""
        return {p.name for p in self.root.iterdir() if p.is_dir() and INTERNAL_ID_RE.fullmatch(p.name)}

    def sweep(self, known_ids: set[str], *, min_age_s: float = 3600.0) -> list[str]:
        """Remove leftovers of interrupted work older than ``min_age_s``: staging and trash folders, and
        adapter folders no registry row names (a crash between the rename and the insert). Returns their names."""
        removed = []
        cutoff = time.time() - min_age_s
        for p in self.root.iterdir():
            if not p.is_dir():
                continue
            stale = p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) or (
                INTERNAL_ID_RE.fullmatch(p.name) is not None and p.name not in known_ids)
            try:
                old = p.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale and old:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        if removed:
            log.warning("removed %d leftover folders from the adapter store: %s", len(removed), removed)
        return removed
