"""Writing files so that a failure never leaves less than there was.

`atomic_write` writes to a temporary file beside the target (`.<name>.<pid>.convmixer-tmp`), flushes and fsyncs
it, and moves it into place with `os.replace`: a crash, a full disk or an error in the middle leaves the old file
(or none) and never a truncated one. Failures to write are one-line `OutputError`s naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".convmixer-tmp"  # `.<name>.<pid>.convmixer-tmp` beside the target; a dead writer's is removable

# errors of the file system itself, whoever raised them inside the `with` block: the output cannot be written
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class OutputError(ValueError):
    """An output file cannot be written (a folder in the way, no permission, a full disk); one line."""


def temporary_path(path: str | os.PathLike) -> Path:
    """Where this process stages `path`: hidden, beside it, on the same file system."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _reason(path: Path, err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"cannot write {path}: no space left on its device ({err.strerror}); free some space or write "
                "it elsewhere (any previous file there is unchanged)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {err.strerror}; choose a folder you can write to"
    if err.errno == errno.ENOTDIR or (err.errno == errno.EEXIST and not path.parent.is_dir()):
        return f"cannot write {path}: a file is in the way of its folder; choose another path"
    return f"cannot write {path}: {err.strerror or err}"


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """A temporary file (mode "w" or "wb", `open_kwargs` for `open`) moved onto `path` when the block ends without
    error, parent folders created; else removed, `path` left as it was. File system errors are `OutputError`s."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name (such as {path / path.name})")
    tmp = temporary_path(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(tmp, mode, **open_kwargs)
        except OSError as err:
            raise OutputError(_reason(path, err)) from err
        with handle:
            try:
                yield handle
            except OSError as err:
                if err.errno in _STORAGE_ERRORS:
                    raise OutputError(_reason(path, err)) from err
                raise
            try:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(tmp, path)
            except OSError as err:
                raise OutputError(_reason(path, err)) from err
    finally:
        with contextlib.suppress(OSError):  # already gone, or its folder went away: nothing of ours is left
            tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the rename made durable (where folders can be opened: not on Windows)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
