"""Running work off the GUI thread, and telling the user about it.

* :class:`Job` runs ``fn(progress, cancel, log)`` in a napari worker thread,
  maps ``progress`` to a napari progress bar and to the dock's own
  :class:`ProgressPanel`, sets a ``threading.Event`` on cancel, and turns
  errors into notifications (never a traceback dialog).
* :func:`error` / :func:`info` / :func:`warning`: napari notifications.
* :func:`warm_up`: starts the child process (or imports torch in a thread) when a
  dock opens, so the first click does not wait for them.
* Mixins :class:`JobOwner` / :class:`CancellableJobOwner`: one job at a time,
  a Cancel button and a status line.

No torch import here.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from magicgui.widgets import Container, Label, ProgressBar
from napari.qt.threading import create_worker
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal

from ..child import fits_in_temp, shared_child
from ..progress import Cancelled

log = logging.getLogger(__name__)

#: Tests may set this to True to run jobs on the calling (GUI) thread.
SYNCHRONOUS = False

#: Environment variable: "0" runs Train and Predict jobs in a worker thread of the
#: viewer's process instead of the shared child process (napari_emseg.child).
CHILD_PROCESS_ENV = "EMSEG_CHILD_PROCESS"

#: Progress callbacks from a worker reach the GUI at most this often (seconds).
PROGRESS_INTERVAL = 0.05

#: Niceness added to a job's worker thread on Linux, so that the GUI thread gets
#: the CPU first (torch's OpenMP threads started from it inherit it). 0 = off.
WORKER_NICE = 10

Work = Callable[[Callable[[int, int], None], Callable[[], bool], Callable[[dict], None]], Any]


# ------------------------------------------------------------------ notifications
def error(message: str) -> None:
    """Show ``message`` as a napari error notification (looked up at call time)."""
    log.info("napari-emseg error: %s", message)
    show_error(message)


def info(message: str) -> None:
    """Show ``message`` as a napari info notification."""
    show_info(message)


def warning(message: str) -> None:
    """Show ``message`` as a napari warning notification."""
    show_warning(message)


# ------------------------------------------------------------------------ jobs
class _Bridge(QObject):
    """Lives in the GUI thread; worker-thread emits arrive queued, in order."""

    progressed = Signal(int, int)
    logged = Signal(object)


class _JobProgress(cancelable_progress):
    """A napari progress bar whose cancel button (activity dock) stops the job."""

    def cancel(self) -> None:
        super().cancel()
        if self.cancel_callback is not None:
            self.cancel_callback()


class Job:
    """One run of ``fn(progress, cancel, log)`` in a napari worker thread.

    Parameters
    ----------
    fn : callable
        Runs in the worker thread. ``progress(done, total)`` and ``log(record)``
        are forwarded to the GUI thread; ``cancel()`` is True once
        :meth:`cancel` was called. Raise to fail; the result is passed to
        ``on_returned`` on the GUI thread.
    description : str
        Progress bar text and prefix of notifications.
    on_returned, on_log, on_finished : callables run on the GUI thread
        ``on_finished(job)`` runs last, after success, failure or cancel.
    synchronous : bool, optional
        Run on the calling thread (default: module-level ``SYNCHRONOUS``).
    preload : tuple of str
        Modules (e.g. ``("torch",)``) imported in the worker before its
        priority is lowered.
    progress_bar : ProgressPanel, optional
        The dock's own bar: started here, updated with each progress report
        and told how the job ended. Without one, the job shows a bar (with
        Cancel) in napari's activity dock.

    Attributes
    ----------
    done, cancelled : bool
    result : the value ``fn`` returned (None on failure)
    exception : the exception ``fn`` raised (None on success)
    worker : the napari ``FunctionWorker`` (None when synchronous)
    """

    def __init__(
        self,
        fn: Work,
        *,
        description: str,
        on_returned: Callable[[Any], None] | None = None,
        on_log: Callable[[dict], None] | None = None,
        on_finished: Callable[[Job], None] | None = None,
        synchronous: bool | None = None,
        preload: tuple[str, ...] = (),
        progress_bar: ProgressPanel | None = None,
    ) -> None:
        self.description = description
        self.progress_bar = progress_bar
        self._preload = preload
        self.done = False
        self.cancelled = False
        self.result: Any = None
        self.exception: BaseException | None = None
        self.worker = None
        self._fn = fn
        self._event = threading.Event()
        self._on_returned = on_returned
        self._on_log = on_log
        self._on_finished = on_finished
        self._last_emit = 0.0
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._show_progress)
        self._bridge.logged.connect(self._forward_log)
        # napari's activity-dock bar only for docks without their own: creating one takes
        # 50-300 ms of the GUI thread (it processes pending events)
        self._pbar = None if progress_bar is not None else _JobProgress(
            total=0, desc=description, cancel_callback=self.cancel)
        if progress_bar is not None:
            progress_bar.start()
        sync = SYNCHRONOUS if synchronous is None else synchronous
        if sync:
            self._run_synchronously()
        else:
            self.worker = create_worker(
                self._work,
                _connect={
                    "returned": self._returned,
                    "errored": self._errored,
                    "finished": self._finished,
                },
                _start_thread=True,
            )

    # -- public
    def cancel(self) -> None:
        """Ask the job to stop at its next cancel check."""
        self._event.set()

    def is_cancelled(self) -> bool:
        """True once :meth:`cancel` was called (thread-safe)."""
        return self._event.is_set()

    # -- worker thread
    def _progress(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last_emit < PROGRESS_INTERVAL:
            return
        self._last_emit = now
        self._bridge.progressed.emit(int(done), int(total))

    def _log(self, record: dict) -> None:
        self._bridge.logged.emit(dict(record))

    def _work(self) -> Any:
        if self._preload:
            # heavy imports hold the GIL: do them before the thread is deprioritised,
            # or the GUI thread waits on a starved GIL holder
            for module in self._preload:
                if module not in sys.modules:
                    __import__(module)
        old = _lower_priority()
        try:
            return self._fn(self._progress, self._event.is_set, self._log)
        finally:
            _restore_priority(old)

    # -- GUI thread
    def _run_synchronously(self) -> None:
        try:
            value = self._fn(self._progress, self._event.is_set, self._log)
        except Exception as exc:  # reported as a notification, like the threaded path
            self._errored(exc)
        else:
            self._returned(value)
        self._finished()

    def _show_progress(self, done: int, total: int) -> None:
        if self.done:
            return
        if self.progress_bar is not None:
            self.progress_bar.update(done, total)
        if self._pbar is None:
            return
        try:
            if self._pbar.total != total:
                self._pbar.total = total
            self._pbar.update(done - self._pbar.n)
        except Exception:  # a progress bar must never break the job
            log.debug("progress update failed", exc_info=True)

    def _forward_log(self, record: dict) -> None:
        if self._on_log is not None and not self.done:
            try:
                self._on_log(record)
            except Exception:
                log.exception("log callback failed")

    def _returned(self, value: Any) -> None:
        self.result = value
        if self._on_returned is None:
            return
        try:
            self._on_returned(value)
        except Exception as exc:
            log.exception("%s: showing the result failed", self.description)
            self.exception = exc
            error(f"{self.description}: could not show the result: {exc}")

    def _errored(self, exc: BaseException) -> None:
        self.exception = exc
        if isinstance(exc, Cancelled):
            self.cancelled = True
            info(f"{self.description}: cancelled")
            return
        log.error("%s failed", self.description, exc_info=exc)
        error(f"{self.description} failed: {exc}")

    def _finished(self) -> None:
        self.done = True
        self.cancelled = self.cancelled or (self._event.is_set() and self.exception is not None)
        try:
            if self._pbar is not None:
                self._pbar.close()
        except Exception:
            log.debug("closing the progress bar failed", exc_info=True)
        if self.progress_bar is not None:
            self.progress_bar.finish(self)
        if self._on_finished is not None:
            try:
                self._on_finished(self)
            except Exception:
                log.exception("finish callback failed")


def _lower_priority() -> int | None:
    """Raise the calling thread's nice value (Linux); returns the old one."""
    if not WORKER_NICE or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:
        old = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, old + WORKER_NICE))
    except (OSError, AttributeError):
        return None
    return old


def _restore_priority(old: int | None) -> None:
    """Undo :func:`_lower_priority` where allowed (unprivileged users cannot)."""
    if old is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), old)
    except OSError:
        pass


# ------------------------------------------------------------ progress panel


def clock(seconds: float) -> str:
    """``75`` → ``"1:15"``, ``3725`` → ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(done: int, total: int, elapsed: float, left: float | None) -> str:
    """``"12/40 · 0:08 elapsed · about 0:19 left"`` (no estimate while ``left`` is None)."""
    text = f"{done}/{total} · {clock(elapsed)} elapsed"
    if done >= total:
        return f"{done}/{total} · done in {clock(elapsed)}"
    return text + (f" · about {clock(left)} left" if left is not None else "")


def budget_text(step: int, elapsed: float, budget: float) -> str:
    """``"step 40 · 0:45 elapsed · at most 1:15 left"`` for a run with a time budget."""
    return (f"step {step} · {clock(elapsed)} elapsed · "
            f"at most {clock(max(0.0, budget - elapsed))} left")


class ProgressPanel(Container):
    """A dock's own progress bar with counts and time left (hidden until a job starts).

    Pass it to :class:`Job` as ``progress_bar``; the job calls :meth:`start`,
    :meth:`update` for each progress report and :meth:`finish`. The time left
    is extrapolated from the rate since the first report (start-up work such
    as loading torch does not count). With ``budget`` (seconds) set, the bar
    shows time instead: elapsed against the budget, the counts as steps.
    """

    def __init__(self) -> None:
        self.bar = ProgressBar(min=0, max=1, value=0, label="")
        self.text = Label(value="")
        super().__init__(widgets=[self.bar, self.text], labels=False)
        self.margins = (0, 0, 0, 0)
        self.budget: float | None = None
        self.done, self.total = 0, 0
        self._t0 = self._first_t = time.perf_counter()
        self._first_done: int | None = None
        self.visible = False

    def start(self) -> None:
        """Show an empty bar and start the clock."""
        self._t0 = time.perf_counter()
        self._first_done = None
        self.done, self.total = 0, 0
        self.bar.max, self.bar.value = (1000 if self.budget else 1), 0
        self.text.value = "starting…"
        self.visible = True

    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.perf_counter() - self._t0

    def seconds_left(self) -> float | None:
        """Estimated seconds until ``done == total``, or None before two reports."""
        if self._first_done is None or self.done <= self._first_done:
            return None
        rate = (time.perf_counter() - self._first_t) / (self.done - self._first_done)
        return rate * max(0, self.total - self.done)

    def update(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` (GUI thread)."""
        if self._first_done is None:
            self._first_done, self._first_t = done, time.perf_counter()
        self.done, self.total = int(done), int(total)
        elapsed = self.elapsed()
        if self.budget:
            self.bar.value = min(1000, int(1000 * elapsed / self.budget))
            self.text.value = budget_text(self.done, elapsed, self.budget)
            return
        self.bar.max = max(1, self.total)
        self.bar.value = min(self.done, self.bar.max)
        self.text.value = progress_text(self.done, self.total, elapsed, self.seconds_left())

    def finish(self, job: Job) -> None:
        """Say how the job ended; the bar keeps its last value (full on success)."""
        try:
            took = clock(self.elapsed())
            counts = f"{self.done}/{self.total} · " if self.total and not self.budget else ""
            if job.cancelled or getattr(job.result, "cancelled", False):  # or stopped early
                self.text.value = f"{counts}cancelled after {took}"
            elif job.exception is not None:
                self.text.value = f"failed after {took}"
            else:
                self.bar.value = self.bar.max
                self.text.value = f"{counts}done in {took}"
        except RuntimeError:  # the widget was closed
            pass


# ------------------------------------------------------------------- warm-up
_WARMED: set[str] = set()

#: What the docks import in the background when they open.


WARM_MODULES = ("torch", "napari_emseg.models.zoo", "napari_emseg.predict",
                "napari_emseg.train")


def child_process_wanted(nbytes: int = 0) -> bool:
    """True when jobs run in the shared child process (:mod:`napari_emseg.child`).

    Torch then never runs, nor is imported, in the viewer's process, so its
    event loop does not wait on the job's Python work. Off with
    ``EMSEG_CHILD_PROCESS=0``, for synchronous jobs (tests) and when ``nbytes``
    of input would not fit the temporary folder.
    """
    return (os.environ.get(CHILD_PROCESS_ENV, "1") != "0" and not SYNCHRONOUS
            and fits_in_temp(nbytes))


def warm_up(modules: tuple[str, ...] = WARM_MODULES) -> threading.Thread | None:
    """Start the child process, or import ``modules`` in a daemon thread (once).

    Importing torch takes seconds; done when a dock opens, the first click on
    Train or Predict starts working at once. With the child process (see
    :func:`child_process_wanted`) torch is imported there, not here, and None
    is returned. Failures are ignored here (the job that needs the module
    reports them).
    """
    if child_process_wanted():
        shared_child().start()
        return None
    todo = tuple(m for m in modules if m not in _WARMED and m not in sys.modules)
    if not todo:
        return None
    _WARMED.update(todo)

    def run() -> None:
        for module in todo:
            try:
                __import__(module)
            except Exception:
                log.debug("warm-up import of %s failed", module, exc_info=True)

    thread = threading.Thread(target=run, name="emseg-warm-up", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------- layers


class JobOwner:
    """Mixin for a dock widget that runs one :class:`Job` at a time (``self.job``)."""

    job: Job | None = None

    def _busy(self) -> bool:
        return self.job is not None and not self.job.done


class CancellableJobOwner(JobOwner):
    """:class:`JobOwner` with a Cancel button and a status line.

    The widget has ``status`` (Label) and ``cancel_button`` (PushButton),
    defines ``_update_state()`` and passes ``on_finished=self._finished``.
    """

    #: status text after a successful job; None keeps what ``on_returned`` wrote
    done_status: str | None = None

    def cancel(self, _value=None) -> None:
        """Stop the running job; the viewer's layers stay as they were."""
        if self._busy():
            self.job.cancel()
            self.status.value = "cancelling…"

    def _finished(self, job: Job) -> None:
        try:
            self.cancel_button.enabled = False
            if job.cancelled:
                self.status.value = "cancelled"
            elif job.exception is not None:
                self.status.value = "failed (see notification)"
            elif self.done_status is not None:
                self.status.value = self.done_status
            self._update_state()
        except RuntimeError:  # widget closed while the job ran
            pass
