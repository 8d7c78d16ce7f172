"""Atomic file and folder writes: write to a temporary sibling, then rename.

Temporaries are hidden siblings named after the target, this machine and the
writing process: ``.<name>.<host>-<pid>-<random>.tmp<suffix>`` (and
``.<name>.<host>-<pid>-old`` for the replaced folder of a zarr target). A
write that was killed leaves them behind; the next write of the same target
removes those whose process is gone (and puts a lost target back from its
``-old`` copy). Temporaries of other targets, of other machines and of live
processes are never touched.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Short tag of this machine, so a shared folder never mixes up process ids.
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success.

    On any exception the temporary file (or folder) is removed and an existing
    ``path`` is left untouched. A folder target (zarr) replaces the old folder
    only after the new one is complete. Stale temporaries of ``path`` left by
    killed writers are removed first (see :func:`clean_stale`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    clean_stale(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{HOST}-{os.getpid()}-",
                                    suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"nothing was written to {path}")
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` whose writer on this machine has died.

    A stale ``-old`` folder is moved back onto ``path`` when ``path`` is
    missing (the writer died between the two renames of a folder swap).

    Returns
    -------
    list of pathlib.Path
        The temporaries removed or restored.
    """
    path = Path(path)
    pattern = re.compile(
        rf"\.{re.escape(path.name)}\.{HOST}-(\d+)-(?:[a-z0-9_]{{8}}\.tmp.*|old)"
    )
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    stale = []
    for name in names:
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            stale.append(path.parent / name)
    for tmp in stale:
        if tmp.name.endswith("-old") and not os.path.lexists(path):
            os.replace(tmp, path)
        else:
            _remove(tmp)
    return stale


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (ours always counts as alive)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: exists, owned by someone else
        return True
    return True


def _alive_windows(pid: int) -> bool:  # pragma: no cover - Windows only
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # access denied: it exists
    code = ctypes.c_ulong()
    try:
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
    finally:
        kernel32.CloseHandle(handle)
    return code.value == 259  # STILL_ACTIVE


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() or (tmp.is_dir() and path.exists()):
        old = path.with_name(f".{path.name}.{HOST}-{os.getpid()}-old")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        p.unlink()
