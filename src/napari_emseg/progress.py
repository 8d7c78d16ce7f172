"""Progress and cancel callbacks shared by the engine's long operations.

Every long operation takes ``progress(done, total)`` and ``cancel() -> bool``
callbacks (both optional); the napari widgets map them to progress bars and a
Cancel button, the CLI to a text bar and Ctrl-C.  A cancelled operation raises
:class:`Cancelled`.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "CancelCheck",
    "Cancelled",
    "ProgressCallback",
    "check_cancel",
    "report",
    "stage_progress",
]

#: ``progress(done, total)``: called as work advances.
ProgressCallback = Callable[[int, int], None]
#: ``cancel()``: True asks the operation to stop (it raises :class:`Cancelled`).
CancelCheck = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised when a long operation stops because ``cancel()`` returned True."""


def check_cancel(cancel: CancelCheck | None) -> None:
    """Raise :class:`Cancelled` if ``cancel`` says so."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def report(progress: ProgressCallback | None, done: int, total: int) -> None:
    """Call ``progress(done, total)`` when a callback is given."""
    if progress is not None:
        progress(done, total)


def stage_progress(
    progress: ProgressCallback | None, start: int, span: int
) -> ProgressCallback | None:
    """Map a stage's ``(done, total)`` onto ``[start, start + span]`` of 1000.

    Parameters
    ----------
    progress : callable(done, total), optional
        The whole operation's callback; None gives None.
    start, span : int
        Where the stage starts and how much of the 1000 steps it covers.
    """
    if progress is None:
        return None

    def cb(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        progress(start + int(round(span * frac)), 1000)

    return cb
