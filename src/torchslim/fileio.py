"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every artifact, report and checkpoint is written to a temporary file in the destination's directory,
flushed to disk and renamed over the destination (``os.replace`` is atomic on POSIX and Windows). A
process killed mid-write (SIGKILL, power loss) can leave only its temporary file behind; those are
named ``.NAME.HOST-PID.XXXXXXXX[SUFFIX].tmp`` and the next write of the same ``NAME`` from the same host
removes the ones whose process is gone (POSIX only; files of live processes and of other hosts stay). Writers
that make their own temporary files (safetensors' ``save_file``) write inside a private directory of that name
instead (:func:`atomic_private_path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchslim.errors import TorchSlimError

_MKSTEMP_CHARS = "[a-z0-9_]{8}"  # tempfile's random part


def _host_tag() -> str:
    """A short, file-name-safe tag of this machine (temp files of other hosts are never cleaned)."""
    return hashlib.blake2b(socket.gethostname().encode("utf-8", "replace"), digest_size=4).hexdigest()


def _temp_pattern(name: str) -> re.Pattern[str]:
    """Our temporary files for destination ``name``; group 1 is the host tag, group 2 the pid."""
    return re.compile(rf"\.{re.escape(name)}\.([0-9a-f]{{8}})-(\d+)\.{_MKSTEMP_CHARS}.*\.tmp")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or a pid out of range
        return True
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files left beside ``path`` by killed writers of ``path`` on this host.

    Only files matching our own temporary name pattern for exactly this destination, written on this host
    by a process that no longer exists, are removed. Does nothing off POSIX (no safe liveness check).

    Args:
        path: the destination file whose leftovers to remove.

    Returns:
        The removed files.
    """
    if os.name != "posix":
        return []
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    pattern = _temp_pattern(final.name)
    host, me = _host_tag(), os.getpid()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = pattern.fullmatch(entry.name)
            if match is None or match.group(1) != host:
                continue
            pid = int(match.group(2))
            if pid == me or _process_alive(pid):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
                elif entry.is_dir(follow_symlinks=False):  # atomic_private_path's directory
                    shutil.rmtree(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the only portable way (and put it back at once)
    os.umask(mask)
    return mask


def _final_mode(final: Path) -> int:
    """Mode for the new file: the replaced file's mode, else what ``open()`` would give (0666 & ~umask)."""
    try:
        return stat.S_IMODE(os.stat(final).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prepare(path: str | os.PathLike) -> tuple[Path, Path, str]:
    """``(final path, its directory, the temporary-name prefix)``, stale temporaries of ``path`` removed.

    Raises:
        TorchSlimError: if the destination directory does not exist.
    """
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.is_dir():
        raise TorchSlimError(f"cannot write {str(final)!r}: directory {str(directory)!r} does not exist")
    remove_stale_temp_files(final)
    return final, directory, f".{final.name}.{_host_tag()}-{os.getpid()}."


def _commit(tmp: Path, final: Path) -> None:
    """fsync the written temporary, give it the replaced file's mode (mkstemp makes 0600) and rename it."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, _final_mode(final))
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    Use it for writers that want a file name (ONNX export, ``savefig``). If the block raises, the
    temporary file is removed and ``path`` is untouched. The new file gets the replaced file's
    permissions (or the umask default for a new file), and stale temporary files of ``path`` left by
    killed writers are removed first (see :func:`remove_stale_temp_files`).

    Args:
        path: final destination; its directory must exist.
        suffix: suffix for the temporary file (defaults to ``path``'s, so writers that look at the
            extension still work).

    Yields:
        The temporary path to write to.

    Raises:
        TorchSlimError: if the destination directory does not exist.
    """
    final, directory, prefix = _prepare(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=prefix, suffix=(suffix if suffix is not None else final.suffix) + ".tmp", dir=directory
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _commit(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(directory)


@contextlib.contextmanager
def atomic_private_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``path``'s name inside a new private temporary directory beside ``path``; on success the file is
    renamed over ``path`` and the directory removed.

    For writers that make temporary files of their own next to the file they are given (safetensors'
    ``save_file`` writes ``.tmpXXXXXX`` and renames it): those land inside the private directory, which carries
    our temporary name, so a killed writer's leftovers are removed by the next write of ``path`` like
    :func:`atomic_path`'s (see :func:`remove_stale_temp_files`). Same guarantees as :func:`atomic_path`.

    Args:
        path: final destination; its directory must exist.

    Yields:
        The temporary path to write to.

    Raises:
        TorchSlimError: if the destination directory does not exist.
    """
    final, directory, prefix = _prepare(path)
    private = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=directory))
    tmp = private / final.name
    try:
        yield tmp
        _commit(tmp, final)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    _fsync_directory(directory)


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
