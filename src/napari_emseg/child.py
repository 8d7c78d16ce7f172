"""Run engine work in a child process, so the viewer's process stays responsive.

Training holds Python's GIL for much of each step (sampling, augmentation, the
optimiser); in a thread of the viewer's process that stalls napari's event
loop for tens to hundreds of milliseconds at a time. In a child process it
cannot. :class:`ChildProcess` starts one process (a new interpreter: no copy
of Qt state, no re-import of the user's script), imports torch there once
(:meth:`ChildProcess.start`, e.g. when a dock opens) and then runs jobs one at
a time::

    child = ChildProcess()
    result = child.run("napari_emseg.workflows:train_from_strokes", kwargs,
                       progress=..., cancel=..., log=..., focus=...)

The target is ``fn(*, progress, cancel, log, focus, **kwargs)``. Large arrays in
``kwargs`` and in the result (alone or in a tuple) travel as temporary ``.npy``
files (memory-mapped read-only in the child, read into memory here);
everything else and the ``log`` records are pickled.
``cancel``, the user's current slice (``focus``) and slices painted meanwhile
(``strokes``) reach the child while it works. An exception in the child is raised again here with its type (builtin
ones) and message; a child that dies (killed, out of memory) is reported and
replaced on the next run.

No torch, no Qt here: the widgets call it from a worker thread, scripts may
call it directly.
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import inspect
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import numpy as np

from .progress import Cancelled

log = logging.getLogger(__name__)

#: Environment variables that hand the child its connection key and sys.path.
KEY_ENV, PATH_ENV = "EMSEG_CHILD_KEY", "EMSEG_CHILD_SYS_PATH"
#: Arrays at least this large (bytes) go through a file instead of the pipe.
FILE_ARRAY_BYTES = 1 << 20
#: Niceness added to the child on Linux/macOS: the viewer gets the CPU first.
CHILD_NICE = 10
#: Seconds between checks of ``cancel`` and ``focus`` while waiting for the child.
POLL_SECONDS = 0.05


#: Job folders in the temp directory: ``emseg-job-<pid of napari's process>-<random>``.
JOB_PREFIX = "emseg-job-"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (always True where this cannot be asked)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_job_folders(temp: str | None = None) -> list[Path]:
    """Delete job folders (large arrays in transit) left by a process that is gone.

    A napari killed while a job ran cannot clean up after itself; the next
    start of a child does it. Returns the folders removed.
    """
    removed = []
    for folder in Path(temp or tempfile.gettempdir()).glob(f"{JOB_PREFIX}*-*"):
        pid = folder.name[len(JOB_PREFIX):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class ChildDied(RuntimeError):
    """The child process ended while running a job."""


class _FileArray:
    """Marker for an array passed as a ``.npy`` file."""

    def __init__(self, path: str) -> None:
        self.path = path


def _to_files(value: Any, stem: str) -> Any:
    """``value`` (or a tuple's items) with large arrays saved as ``<stem>[-k].npy``."""
    if isinstance(value, tuple):
        return tuple(_to_files(v, f"{stem}-{k}") for k, v in enumerate(value))
    if isinstance(value, np.ndarray) and value.nbytes >= FILE_ARRAY_BYTES \
            and value.dtype != object:
        np.save(f"{stem}.npy", value)
        return _FileArray(f"{stem}.npy")
    return value


def _from_files(value: Any, mmap_mode: str | None) -> Any:
    """Inverse of :func:`_to_files`: markers become arrays (memory-mapped or read)."""
    if isinstance(value, tuple):
        return tuple(_from_files(v, mmap_mode) for v in value)
    return np.load(value.path, mmap_mode=mmap_mode) if isinstance(value, _FileArray) \
        else value


def resolve_target(target: str) -> Callable:
    """``"package.module:function"`` → the function."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"{module} has no function {name!r}")
    return fn


# ---------------------------------------------------------------- child side
class _Inbox:
    """The child's view of messages from the parent: cancel, focus and new strokes."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.cancelled = False
        self.focus: Any = None
        self.strokes: dict = {}

    def drain(self) -> None:
        while self.conn.poll():
            kind, value = self.conn.recv()
            if kind == "cancel":
                self.cancelled = True
            elif kind == "focus":
                self.focus = value
            elif kind == "strokes":
                self.strokes.update(value)

    def cancel(self) -> bool:
        self.drain()
        return self.cancelled

    def take_strokes(self) -> dict | None:
        """Slices painted since the last call (``{z: labels}``), or None."""
        self.drain()
        out, self.strokes = self.strokes, {}
        return out or None


def _error_message(exc: BaseException) -> tuple:
    return ("error", type(exc).__name__, str(exc), traceback.format_exc())


def _run_one(conn, target: str, kwargs: dict) -> None:
    inbox = _Inbox(conn)
    inbox.focus = kwargs.pop("_focus", None)
    folder = kwargs.pop("_folder")

    def focus():
        inbox.drain()
        return inbox.focus

    try:
        fn = resolve_target(target)
        if "strokes" in inspect.signature(fn).parameters:
            kwargs["strokes"] = inbox.take_strokes
        value = fn(progress=lambda done, total: conn.send(("progress", (done, total))),
                   cancel=inbox.cancel, log=lambda record: conn.send(("log", record)),
                   focus=focus, **{k: _from_files(v, "r") for k, v in kwargs.items()})
        conn.send(("result", _to_files(value, os.path.join(folder, "result"))))
    except Cancelled:
        conn.send(("cancelled", None))
    except Exception as exc:  # sent to the parent, raised there again
        conn.send(_error_message(exc))


def _child_main(conn, preload: tuple[str, ...], nice: int) -> None:  # runs in the child
    """The child's loop: import ``preload``, then run jobs until told to stop."""
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception:  # the job that needs it reports the failure
            pass
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "run":
            _run_one(conn, message[1], message[2])


# --------------------------------------------------------------- parent side
def _raise_again(name: str, message: str, tb: str):
    """The child's exception as one of the same builtin type (else RuntimeError)."""
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls, message = RuntimeError, f"{name}: {message}"
    log.debug("the child process raised:\n%s", tb)  # the user sees the message
    try:
        exc = cls(message)
    except Exception:
        exc = RuntimeError(f"{name}: {message}")
    raise exc


class ChildProcess:
    """One worker process that runs jobs one at a time (see the module docstring).

    Parameters
    ----------
    preload : modules the child imports as soon as it starts.
    nice : niceness added to the child (0 = none).
    """

    def __init__(self, preload: tuple[str, ...] = ("torch",), nice: int = CHILD_NICE) -> None:
        self.preload, self.nice = tuple(preload), int(nice)
        self._process: subprocess.Popen | None = None
        self._conn = None
        self._connected = threading.Event()
        self._ready = False  # the child has imported ``preload``
        self._lock = threading.Lock()  # one job at a time

    # -- lifecycle
    def start(self) -> None:
        """Start the child (returns at once; it imports ``preload`` in the background).

        ``python -m napari_emseg.child`` in a new interpreter, not multiprocessing's
        spawn: spawn re-imports the parent's ``__main__``, and a user's napari script
        without a ``__name__ == "__main__"`` guard would open a second viewer.
        """
        if self.alive():
            return
        self.stop(0.1)
        remove_stale_job_folders()
        key = secrets.token_bytes(32)
        listener = Listener(authkey=key)
        env = {**os.environ, KEY_ENV: key.hex(), PATH_ENV: json.dumps(sys.path)}
        command = [sys.executable, "-m", "napari_emseg.child", str(listener.address),
                   ",".join(self.preload), str(self.nice)]
        self._process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        self._ready, self._conn = False, None
        self._connected = threading.Event()
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name="emseg-child-accept").start()

    def _accept(self, listener) -> None:
        try:
            self._conn = listener.accept()
            self._connected.set()
        except (OSError, EOFError):
            pass
        finally:
            listener.close()

    def _wait_connected(self, timeout: float = 120.0) -> None:
        """Wait until the child has connected (raises :class:`ChildDied` if it ended)."""
        deadline = time.monotonic() + timeout
        while not self._connected.wait(POLL_SECONDS):
            if not self.alive() or time.monotonic() > deadline:
                self._died()

    def alive(self) -> bool:
        """True while the child process runs."""
        return self._process is not None and self._process.poll() is None

    def ready(self) -> bool:
        """True once the child has imported ``preload`` (never blocks)."""
        if self._ready or self._conn is None or not self.alive() \
                or not self._lock.acquire(blocking=False):
            return self._ready
        try:
            while not self._ready and self._conn.poll():
                self._ready = self._conn.recv()[0] == "ready"
        except (EOFError, OSError):
            pass
        finally:
            self._lock.release()
        return self._ready

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to exit (killed after ``timeout`` seconds)."""
        if self._process is None:
            return
        if self._conn is not None:
            self._send(("stop", None))
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    # -- jobs
    def run(self, target: str, kwargs: dict, *,
            progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None,
            log: Callable[[dict], None] | None = None,
            focus: Callable[[], Any] | None = None,
            strokes: Callable[[], dict | None] | None = None) -> Any:
        """Run ``target(**kwargs)`` in the child and return its result.

        Blocks the calling thread (call it from a worker thread) while
        forwarding progress and log records and passing on cancel, focus and
        ``strokes()`` (slices painted while it runs, ``{z: labels}``; a target
        with a ``strokes`` parameter gets them).
        Raises :class:`~napari_emseg.progress.Cancelled` when the job was
        cancelled and :class:`ChildDied` when the child ended unexpectedly.
        """
        with self._lock:
            if not self.alive():
                self.start()
            self._wait_connected()
            folder = Path(tempfile.mkdtemp(prefix=f"{JOB_PREFIX}{os.getpid()}-"))
            try:
                sent = {k: _to_files(v, str(folder / k)) for k, v in kwargs.items()}
                sent["_focus"] = focus() if focus else None
                sent["_folder"] = str(folder)
                self._conn.send(("run", target, sent))
                return self._wait(progress, cancel, log, focus, sent["_focus"], strokes)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    def _wait(self, progress, cancel, log, focus, last_focus, strokes=None) -> Any:
        told_cancel = False
        while True:
            if cancel is not None and not told_cancel and cancel():
                self._send(("cancel", None))
                told_cancel = True
            if focus is not None:
                now = focus()
                if now != last_focus:
                    self._send(("focus", now))
                    last_focus = now
            painted = strokes() if strokes is not None else None
            if painted:
                self._send(("strokes", painted))
            if not self._conn.poll(POLL_SECONDS):
                if not self.alive():
                    self._died()
                continue
            try:
                kind, *payload = self._conn.recv()
            except (EOFError, OSError):
                self._died()
            if kind == "progress" and progress is not None:
                progress(*payload[0])
            elif kind == "log" and log is not None:
                log(payload[0])
            elif kind == "ready":
                self._ready = True
            elif kind == "result":
                return _from_files(payload[0], None)  # read into memory
            elif kind == "cancelled":
                raise Cancelled()
            elif kind == "error":
                _raise_again(*payload)

    def _died(self):
        """Raise :class:`ChildDied` with the child's exit code (waits for it briefly)."""
        process, code = self._process, None
        if process is not None:
            try:
                code = process.wait(2.0)
            except subprocess.TimeoutExpired:
                process.kill()  # hung, not connected: replaced on the next run
                code = process.wait(2.0)
        raise ChildDied(f"the worker process ended unexpectedly (exit code {code}; "
                        "out of memory?)")

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            pass  # a dead child is reported by _wait


def fits_in_temp(nbytes: int) -> bool:
    """True when ``nbytes`` of job arrays (and as much for results) fit the temp folder."""
    try:
        free = shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return False
    return 2 * int(nbytes) + (256 << 20) < free


#: What the docks' child imports before its first job.
SHARED_PRELOAD = ("torch", "napari_emseg.workflows", "napari_emseg.predict",
                  "napari_emseg.train")
_SHARED: ChildProcess | None = None


def shared_child() -> ChildProcess:
    """The process-wide :class:`ChildProcess` the docks share (created on first use)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = ChildProcess(preload=SHARED_PRELOAD)
        atexit.register(_SHARED.stop, 2.0)  # it would also exit when its pipe closes
    return _SHARED


def main(argv: list[str]) -> None:
    """The child's entry point: ``python -m napari_emseg.child ADDRESS PRELOAD NICE``."""
    address, preload, nice = argv[0], tuple(m for m in argv[1].split(",") if m), int(argv[2])
    sys.path[:] = json.loads(os.environ.pop(PATH_ENV, "[]")) or sys.path
    conn = Client(address, authkey=bytes.fromhex(os.environ.pop(KEY_ENV)))
    _child_main(conn, preload, nice)


if __name__ == "__main__":  # run as a script: use the importable module's classes
    importlib.import_module("napari_emseg.child").main(sys.argv[1:])
