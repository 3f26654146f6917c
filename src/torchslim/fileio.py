"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchslim.errors import TorchSlimError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    Use it for writers that want a file name (ONNX export, ``savefig``). If the block raises, the
    temporary file is removed and ``path`` is untouched.

    Args:
        path: final destination; its directory must exist.
        suffix: suffix for the temporary file (defaults to ``path``'s, so writers that look at the
            extension still work).

    Yields:
        The temporary path to write to.

    Raises:
        TorchSlimError: if the destination directory does not exist.
    """
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.is_dir():
        raise TorchSlimError(f"cannot write {str(final)!r}: directory {str(directory)!r} does not exist")
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.",
        suffix=(suffix if suffix is not None else final.suffix) + ".tmp",
        dir=directory,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename in the same directory).

    Args:
        path: destination file.
        data: the complete file content.

    Returns:
        The destination as a ``Path``.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to replace an existing file (an input or an earlier output) unless ``force``.

    Args:
        output: where the caller wants to write.
        inputs: files the operation reads.
        force: allow replacing an existing ``output``, even one of ``inputs`` (writes are atomic).

    Returns:
        ``output`` as a ``Path``.

    Raises:
        TorchSlimError: if ``output`` exists (and is maybe one of ``inputs``) and ``force`` is false.
    """
    out = Path(output)
    if force:
        return out
    for source in inputs:
        src = Path(source)
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise TorchSlimError(f"output {str(out)!r} is also an input: choose another output path or pass --force")
    if out.exists() and not force:
        raise TorchSlimError(f"output {str(out)!r} already exists: pass --force (force=True) to replace it")
    return out
