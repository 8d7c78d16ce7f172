"""The child process that runs dock jobs: results, callbacks, cancel, errors, death.

The targets below live in this module; the child imports it by name (pytest
puts tests/ on sys.path, and a spawned child inherits sys.path).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from napari_emseg import child
from napari_emseg.child import ChildDied, ChildProcess
from napari_emseg.progress import Cancelled


def summed(*, array, offset, progress, cancel, log, focus):
    """Sum of ``array`` + offset; reports progress 1/2, 2/2 and logs the focus."""
    progress(1, 2)
    log({"focus": focus(), "pid": os.getpid(), "writable": bool(array.flags.writeable)})
    progress(2, 2)
    return float(np.asarray(array, np.float64).sum()) + offset


def until_cancelled(*, progress, cancel, log, focus):
    """Logs each new focus until cancelled (then raises Cancelled)."""
    seen = None
    for _ in range(2000):
        if focus() != seen:
            seen = focus()
            log({"focus": seen})
        if cancel():
            from napari_emseg.progress import Cancelled
            raise Cancelled()
        time.sleep(0.01)
    return "never cancelled"


def collects_strokes(*, progress, cancel, log, focus, strokes):
    """Logs the slices of each strokes update until cancelled."""
    for _ in range(2000):
        new = strokes()
        if new:
            log({z: int(np.asarray(s).sum()) for z, s in new.items()})
        if cancel():
            return "done"
        time.sleep(0.01)
    return "never cancelled"


def fails(*, progress, cancel, log, focus, kind):
    """Raises a ValueError or a custom exception."""
    if kind == "value":
        raise ValueError("bad input: shapes differ")

    class Odd(Exception):
        pass
    raise Odd("something odd")


def dies(*, progress, cancel, log, focus):
    os._exit(3)


@pytest.fixture(scope="module")
def proc():
    p = ChildProcess(preload=())
    p.start()
    yield p
    p.stop()


def test_runs_target_with_file_array_and_callbacks(proc, monkeypatch, tmp_path):
    monkeypatch.setattr(child, "FILE_ARRAY_BYTES", 1000)  # force the .npy file path
    monkeypatch.setattr(child.tempfile, "tempdir", str(tmp_path))
    array = np.arange(20_000, dtype=np.float32).reshape(100, 200)
    progress, logs = [], []
    out = proc.run("test_child:summed", {"array": array, "offset": 5},
                   progress=lambda d, t: progress.append((d, t)), log=logs.append,
                   focus=lambda: 7)
    assert out == float(array.astype(np.float64).sum()) + 5
    assert progress == [(1, 2), (2, 2)]
    assert logs[0]["focus"] == 7 and logs[0]["pid"] != os.getpid()
    assert logs[0]["writable"] is False  # a read-only memmap: the input is never changed
    assert list(tmp_path.iterdir()) == []  # the job's .npy files are gone


def test_cancel_and_focus_reach_the_child(proc):
    logs = []
    z = {"value": 1}
    stop = threading.Event()

    def driver():
        time.sleep(0.3)
        z["value"] = 4  # the user moved to another slice
        time.sleep(0.3)
        stop.set()

    threading.Thread(target=driver, daemon=True).start()
    with pytest.raises(Cancelled):
        proc.run("test_child:until_cancelled", {}, log=logs.append, cancel=stop.is_set,
                 focus=lambda: z["value"])
    assert [r["focus"] for r in logs] == [1, 4]
    # the child is still there for the next job
    assert proc.run("test_child:summed", {"array": np.ones(3), "offset": 0}) == 3.0


def test_errors_come_back_with_type_and_message(proc):
    with pytest.raises(ValueError, match="bad input: shapes differ"):
        proc.run("test_child:fails", {"kind": "value"})
    with pytest.raises(RuntimeError, match="Odd: something odd"):
        proc.run("test_child:fails", {"kind": "odd"})
    with pytest.raises(ValueError, match="test_child has no function 'no_such_function'"):
        proc.run("test_child:no_such_function", {})


def test_a_dead_child_is_reported_and_replaced():
    p = ChildProcess(preload=("json",))
    p.start()
    deadline = time.time() + 60
    while not p.ready() and time.time() < deadline:
        time.sleep(0.05)
    assert p.ready()
    try:
        with pytest.raises(ChildDied, match="exit code 3"):
            p.run("test_child:dies", {})
        assert p.run("test_child:summed", {"array": np.ones(4), "offset": 1}) == 5.0
    finally:
        p.stop()
    assert not p.alive()


def big_result(*, shape, progress, cancel, log, focus):
    """A (large) array and a note, as a tuple."""
    return np.full(shape, 0.25, np.float32), "note"


def test_large_array_results_come_back_through_files(proc, monkeypatch, tmp_path):
    monkeypatch.setattr(child.tempfile, "tempdir", str(tmp_path))
    prob, note = proc.run("test_child:big_result", {"shape": (3, 300, 400)})
    assert note == "note" and prob.shape == (3, 300, 400) and prob.dtype == np.float32
    assert prob.flags.writeable and float(prob.mean()) == 0.25  # in memory, not a memmap
    assert list(tmp_path.iterdir()) == []


def test_a_script_without_main_guard_runs_once(tmp_path):
    """The child is a new interpreter: a user's napari script is not executed again
    in it (multiprocessing's spawn would re-import it and open a second viewer)."""
    import subprocess
    import sys

    marker = tmp_path / "runs.txt"
    (tmp_path / "helper.py").write_text("def answer(**_):\n    return 42\n")
    script = tmp_path / "user_script.py"
    script.write_text(
        "from napari_emseg.child import ChildProcess\n"
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        "p = ChildProcess(preload=())\n"
        "print(p.run('helper:answer', {}))\n"
        "p.stop()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    assert marker.read_text() == "ran\n"


def test_strokes_painted_meanwhile_reach_the_child(proc):
    logs = []
    outbox = [{2: np.ones((4, 4), np.uint8)}, None, {5: np.full((4, 4), 2, np.uint8)}]
    stop = threading.Event()

    def strokes():
        if outbox:
            time.sleep(0.05)
            return outbox.pop(0)
        stop.set()
        return None

    out = proc.run("test_child:collects_strokes", {}, log=logs.append, cancel=stop.is_set,
                   strokes=strokes)
    assert out == "done"
    assert {k: v for r in logs for k, v in r.items()} == {2: 16, 5: 32}
    # a target without a strokes parameter runs as before
    assert proc.run("test_child:summed", {"array": np.ones(3), "offset": 0},
                    strokes=lambda: {1: np.ones((2, 2))}) == 3.0


def test_job_folders_of_a_killed_napari_are_removed(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{child.JOB_PREFIX}{gone.pid}-abc"
    mine = tmp_path / f"{child.JOB_PREFIX}{os.getpid()}-def"
    other = tmp_path / "emseg-job-notapid"
    for folder in (stale, mine, other):
        folder.mkdir()
        (folder / "image.npy").write_bytes(b"x")
    assert child.remove_stale_job_folders(str(tmp_path)) == [stale]
    assert not stale.exists() and mine.exists() and other.exists()
