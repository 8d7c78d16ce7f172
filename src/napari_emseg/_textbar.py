"""A one-line text progress bar for the command line (``progress(done, total)``)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Redraws ``label [####----] done/total unit  pct  elapsed, eta`` on a stream.

    Redraws at most every 0.2 s (and always at the end). With ``total`` of
    10**8 or more only the count is shown (open-ended runs).
    """

    def __init__(self, label: str, unit: str = "", stream=None, width: int = 30) -> None:
        self.label = label
        self.unit = f" {unit}" if unit else ""
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self._last = -1.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        elapsed = now - self.start
        if total >= 10**8:
            self.stream.write(f"\r{self.label}: {done}{self.unit} {elapsed:5.0f} s  ")
            self.stream.flush()
            return
        frac = done / total if total else 1.0
        filled = int(round(self.width * frac))
        bar = "#" * filled + "-" * (self.width - filled)
        eta = f", {elapsed / frac - elapsed:5.0f} s left" if 0 < frac < 1 else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total}{self.unit} "
                          f"{100 * frac:3.0f}% {elapsed:5.0f} s{eta}  ")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def progress_bar(label: str, unit: str = "", quiet: bool = False) -> ProgressBar | None:
    """A :class:`ProgressBar` on stderr, or ``None`` when ``quiet``."""
    return None if quiet else ProgressBar(label, unit)
