"""Files written whole: the old content or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(
    path: Path, write: Callable[[IO[bytes]], None], *, mode: int | None = None
) -> None:
    """Write ``path`` so that it is either the old file or the complete new one, never a
    part: a temporary file in the same directory, fsync'ed, then renamed over ``path``.

    ``mode``: the file's permissions, set before any byte is written (the temporary file is
    created 0600, so a private key is never readable by others, not even for a moment);
    ``None`` keeps 0600.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
