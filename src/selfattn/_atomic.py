"""Files a user keeps, written atomically: a leaf module (it imports nothing from selfattn, and
not torch).

The bytes go to a temporary file in the same folder (``.NAME.XXXX.tmp``), are flushed to disk,
and the file is renamed over the target: ``os.replace`` is atomic on POSIX and Windows, so a
reader, a Ctrl-C or a kill at any moment sees the old file or the new one, never half of one.
The folder is flushed after the rename, so the new name survives a power cut too. A write that
fails leaves the old file untouched, removes the temporary one and raises the `OSError`.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"  # every temporary name ends so; a kill can leave one behind


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """``text`` as UTF-8, atomically."""
    write_bytes(path, text.encode("utf-8"))


def save_figure(fig, path: str | os.PathLike[str], **savefig) -> None:
    """A matplotlib figure saved atomically: drawn into memory, then written. ``savefig``:
    matplotlib's arguments (``format`` defaults to the name's ending)."""
    buffer = io.BytesIO()
    fmt = savefig.pop("format", None) or Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buffer, format=fmt, **savefig)
    write_bytes(path, buffer.getvalue())


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where that is impossible."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
