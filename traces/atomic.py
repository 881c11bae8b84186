"""Write a file atomically: into a temporary sibling, then rename, so no reader ever sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, suffix: str = ".tmp") -> Path:
    """Call `write(tmp_path)`, then rename tmp_path to `path`; on any error the temporary file is removed.

    `suffix` lets writers that insist on an extension (numpy's savez, matplotlib) keep their own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
