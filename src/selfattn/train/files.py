"""Durable file writes for a run's folder: `selfattn._atomic`'s (a temporary file in the same
folder, flushed to disk, then renamed: a reader, or a run killed at any moment, sees the old
file or the new one, never half of one), with the run's own error.

A write that fails (a full disk, a read-only folder) raises `CheckpointWriteError`, an
`OSError` whose message names the file: ``cannot write runs/x/model.safetensors: No space left
on device``. The old file is untouched and the temporary one removed.
"""

from __future__ import annotations

import os
from pathlib import Path

from selfattn import _atomic
from selfattn._atomic import TMP_SUFFIX


class CheckpointWriteError(OSError):
    """A file of a run (a checkpoint, its manifest, config.json, ...) could not be written.
    ``str(err)`` is the one-line message; ``err.errno`` the cause's (ENOSPC, EROFS, ...). The
    input was fine, the run failed: the CLI exits with 1 (``exit_status``), not 2."""

    exit_status = 1


def cannot_write(path: Path, err: OSError) -> CheckpointWriteError:
    """The error to raise when writing ``path`` failed with ``err``."""
    if isinstance(err, CheckpointWriteError):
        return err
    reason = err.strerror or str(err) or type(err).__name__
    error = CheckpointWriteError(f"cannot write {path}: {reason}")
    error.errno = err.errno
    return error


def write_durably(path: Path, data: bytes, shown: Path | None = None) -> None:
    """Write ``data`` to ``path`` (a new file, or one replaced in place) and flush it to disk.
    ``shown``: the file a failure names (default ``path``), e.g. the one ``path`` will become."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise cannot_write(path if shown is None else Path(shown), err) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (`CheckpointWriteError` when it cannot be done)."""
    try:
        _atomic.write_bytes(path, data)
    except OSError as err:
        raise cannot_write(Path(path), err) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``; `CheckpointWriteError` naming ``dst`` when it fails."""
    try:
        os.replace(src, dst)
    except OSError as err:
        raise cannot_write(Path(dst), err) from None


def remove_stale(folder: Path) -> None:
    """Remove the temporary files (``.NAME.XXXX.tmp``) a killed write left in ``folder``."""
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        path.unlink(missing_ok=True)
