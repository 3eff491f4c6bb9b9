"""The adapter store: validated adapter folders on disk, addressed by internal id, shared with the engine.

Layout (the engine's resolver reads the same)::

    <store>/fl-<32 hex>/adapter_config.json      (written by the gateway: the validated config, canonical)
    <store>/fl-<32 hex>/adapter_model.safetensors
    <store>/fl-<32 hex>/flylora_engine.bf16.safetensors  (the engine form, written from the validated weights:
                                                 flylora_runtime.format.engine_form; optional, bf16 engines use it)
    <store>/fl-<32 hex>/DELETED                  (tombstone: being deleted, the engine's resolver refuses it)
    <store>/.tmp-<hex>/          uploads being received (never read by the engine)
    <store>/.trash-<hex>/        folders being removed

A folder appears under its id only complete: files are written into a staging folder inside the store,
fsynced, and the folder is renamed into place (``os.rename`` is atomic within one file system). Deletion
writes the tombstone first; the folder is removed (renamed away, then deleted, so the engine never sees
half a folder) only once every engine has let go of the adapter. Leftovers of interrupted work are swept
by age (:meth:`AdapterStore.sweep`), at start-up and periodically.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from flylora_runtime.format.checkpoint import CONFIG_NAME, TOMBSTONE_NAME, WEIGHTS_NAME
from flylora_runtime.format.config import FlyLoRAConfig
from flylora_runtime.format.errors import AdapterError
from flylora_runtime.format import engine_form
from flylora_runtime.format.engine_form import ENGINE_FORM_NAME

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
        if (staging / ENGINE_FORM_NAME).exists():
            _fsync_path(staging / ENGINE_FORM_NAME)
        _fsync_path(staging, directory=True)
        if final.exists():
            raise FileExistsError(final)
        os.rename(staging, final)
        _fsync_path(self.root, directory=True)
        return final

    def write_config(self, staging: Path, data: bytes) -> None:
        """Replace the staged config (with the canonical one the validator produced)."""
        staging_config, _ = self.staged_files(staging)
        staging_config.write_bytes(data)

    def write_engine_form(self, staging: Path, scaling: float) -> int:
        """Write the staged (validated) weights' bf16 engine form beside them (``scaling``: the config's
        ``lora_alpha / r``); its size, or 0 when it could not be written (logged: the adapter is stored and
        served without it, from its checkpoint). Blocking."""
        _, weights = self.staged_files(staging)
        try:
            return engine_form.write_engine_form(weights, staging / ENGINE_FORM_NAME, scaling)
        except (OSError, ValueError) as exc:
            log.warning("engine form of %s not written (%s); engines will convert the checkpoint", staging.name, exc)
            return 0

    def add_engine_form(self, internal_id: str) -> int:
        """Write the engine form of a stored adapter that has none (stored before forms were written); its size,
        or 0 when there was nothing to do or it failed (logged). The folder must have been verified intact.
        Blocking."""
        folder = self.path(internal_id)
        if (folder / ENGINE_FORM_NAME).exists() or (folder / TOMBSTONE_NAME).exists() or not folder.is_dir():
            return 0
        try:
            scaling = FlyLoRAConfig.from_json_bytes((folder / CONFIG_NAME).read_bytes()).scaling
            size = engine_form.write_engine_form(folder / WEIGHTS_NAME, folder / ENGINE_FORM_NAME, scaling)
            _fsync_path(folder, directory=True)
            return size
        except (OSError, ValueError, AdapterError) as exc:  # being deleted, a full disk, a value beyond bf16
            log.warning("engine form of %s not written (%s); engines will convert the checkpoint", internal_id, exc)
            return 0

    def tombstone(self, internal_id: str) -> None:
        """Mark an adapter's folder as being deleted (the engine's resolver refuses it from now on)."""
        folder = self.path(internal_id)
        if folder.is_dir():
            (folder / TOMBSTONE_NAME).touch()
            _fsync_path(folder, directory=True)

    def free_bytes(self) -> int:
        """Free space on the store's file system, for unprivileged writers."""
        return shutil.disk_usage(self.root).free

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

    def sweep(self, known_ids: set[str] | None, *, min_age_s: float = 3600.0,
              active: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove leftovers of interrupted work not written for ``min_age_s``: staging and trash folders, and
        (when ``known_ids`` is given) adapter folders no registry row names (a crash between the rename and the
        insert). ``active``: folder names in use by this process (never removed). Returns the names removed.

        Age is the newest mtime of the folder and its files, so an upload still being received is not taken
        for a leftover however long it has been running.
        """
        removed = []
        cutoff = time.time() - min_age_s
        for p in self.root.iterdir():
            if not p.is_dir() or p.name in active:
                continue
            stale = p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) or (
                known_ids is not None and INTERNAL_ID_RE.fullmatch(p.name) is not None and p.name not in known_ids)
            if stale and _newest_mtime(p) < cutoff:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        if removed:
            log.warning("removed %d leftover folders from the adapter store: %s", len(removed), removed)
        return removed


def _newest_mtime(folder: Path) -> float:
    """The newest mtime of a folder and the entries in it (inf when it vanished meanwhile: not stale)."""
    try:
        newest = folder.stat().st_mtime
        for entry in os.scandir(folder):
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                continue
        return newest
    except FileNotFoundError:
        return float("inf")
