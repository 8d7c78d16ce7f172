"""Progress and cancel callbacks shared by the engine's long operations."""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int], None]
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
