"""Run one function per block: sequentially, on local threads or on a dask cluster.

``distributed`` is imported only when a scheduler address is connected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from ..progress import CancelCheck, Cancelled, ProgressCallback, check_cancel, report

__all__ = ["BlockProgress", "connect_client", "map_blocks", "resolve_client"]

OnDone = Callable[[Any, Any], None]


class BlockProgress:
    """An ``on_done`` callback reporting ``progress(done, total)`` as blocks finish."""

    def __init__(self, progress: ProgressCallback | None, total: int, done: int = 0) -> None:
        self.progress, self.total, self.done = progress, total, done
        report(progress, done, total)

    def __call__(self, _item=None, _result=None) -> None:
        self.done += 1
        report(self.progress, self.done, self.total)


def connect_client(address: str, timeout: float = 10.0):
    """Connect to a running ``dask.distributed`` scheduler.

    Parameters
    ----------
    address : str
        e.g. ``"tcp://10.0.0.5:8786"``.
    timeout : float
        Seconds to wait before giving up.

    Returns
    -------
    distributed.Client

    Raises
    ------
    ConnectionError
        The scheduler cannot be reached in time (an ``OSError``).
    ImportError
        ``distributed`` is not installed.
    """
    try:
        from distributed import Client
    except ImportError:
        raise ImportError(
            "a dask scheduler needs the 'distributed' package: "
            "pip install 'napari-emseg[distributed]'"
        ) from None
    _check_address(address)
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"cannot reach the dask scheduler at {address!r} within {timeout:g} s ({exc}). "
            "Start one with `dask scheduler` and workers with `dask worker ADDRESS`, "
            "or run without a scheduler to use local threads."
        ) from None
    except ValueError as exc:
        raise ValueError(f"invalid dask scheduler address {address!r}: {exc}") from None


def _check_address(address: str) -> None:
    """A bad scheme fails here, quietly (before any connection attempt)."""
    try:
        from distributed.comm import parse_address
        from distributed.comm.registry import get_backend

        get_backend(parse_address(str(address))[0])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid dask scheduler address {address!r}: {exc}") from None


def resolve_client(client, timeout: float = 10.0):
    """(client, owned): connect when given an address (then the caller closes it)."""
    if client is None:
        return None, False
    if isinstance(client, str):
        return connect_client(client, timeout), True
    return client, False


def map_blocks(
    fn: Callable,
    items: Sequence,
    *,
    client=None,
    workers: int = 1,
    scatter: dict | None = None,
    static: dict | None = None,
    data: Callable | None = None,
    on_done: OnDone | None = None,
    cancel: CancelCheck | None = None,
) -> None:
    """Run ``fn(item, **scatter, **static[, data=...])`` for every item.

    Local: sequentially (``workers <= 1``) or on a thread pool; ``fn`` also gets
    ``cancel``.  Distributed: one task per item, at most ~2 per worker thread in
    flight; ``scatter`` values are broadcast to the workers once.  ``data(item)``
    (optional) reads block data on the driver, for sources workers cannot open.
    ``on_done(item, result)`` runs on the driver as items finish.  A cancel
    stops submitting, waits for (local) or cancels (distributed) the rest and
    raises :class:`~napari_emseg.progress.Cancelled`.
    """
    items = list(items)
    if not items:
        return
    call = _Call(fn, dict(scatter or {}), dict(static or {}), data)
    if client is None and workers <= 1:
        _run_sequential(call, items, on_done, cancel)
    elif client is None:
        _run_threads(call, items, int(workers), on_done, cancel)
    else:
        _run_distributed(call, items, client, on_done, cancel)


@dataclass
class _Call:
    """``fn`` with the arguments shared by every item."""

    fn: Callable
    scatter: dict
    static: dict
    data: Callable | None

    def extra(self, item) -> dict:
        return {"data": self.data(item)} if self.data is not None else {}


def _run_sequential(call: _Call, items: list, on_done: OnDone | None,
                    cancel: CancelCheck | None) -> None:
    for item in items:
        check_cancel(cancel)
        result = call.fn(item, **call.scatter, **call.static, cancel=cancel, **call.extra(item))
        if on_done is not None:
            on_done(item, result)


def _run_threads(call: _Call, items: list, workers: int, on_done: OnDone | None,
                 cancel: CancelCheck | None) -> None:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emseg-block")

    def submit(item):
        return pool.submit(call.fn, item, **call.scatter, **call.static, cancel=cancel,
                           **call.extra(item))

    def cancel_rest(futs):
        for f in futs:
            f.cancel()
        wait(futs)

    try:
        _drive(items, submit, wait, cancel_rest, 2 * workers, on_done, cancel)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_distributed(call: _Call, items: list, client, on_done: OnDone | None,
                     cancel: CancelCheck | None) -> None:
    scattered = {k: client.scatter(v, broadcast=True, hash=False)
                 for k, v in call.scatter.items()}
    nthreads = sum(client.nthreads().values()) or 1

    def submit(item):
        return client.submit(call.fn, item, **scattered, **call.static, pure=False,
                             **call.extra(item))

    def cancel_rest(futs):
        if futs:
            client.cancel(list(futs))

    _drive(items, submit, _poll, cancel_rest, max(2, 2 * nthreads), on_done, cancel)


def _poll(futs, return_when):
    """Wait for the first finished future, polling: ``distributed.wait()`` needs a
    default client, which we never set."""
    while True:
        finished = [f for f in futs if f.done()]
        if finished:
            return finished, None
        time.sleep(0.01)


def _drive(items: list, submit: Callable, waiter: Callable, cancel_rest: Callable,
           limit: int, on_done: OnDone | None, cancel: CancelCheck | None) -> None:
    """Keep at most ``limit`` items in flight until all are done; cancel the rest on error."""
    pending: dict[Any, Any] = {}
    todo = iter(items)
    try:
        while True:
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the user")
            while len(pending) < limit:
                item = next(todo, None)
                if item is None:
                    break
                pending[submit(item)] = item
            if not pending:
                break
            finished, _ = waiter(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                item = pending.pop(fut)
                result = fut.result()
                if on_done is not None:
                    on_done(item, result)
    except BaseException:
        cancel_rest(list(pending))
        raise

