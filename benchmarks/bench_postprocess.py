"""Benchmark: z-filter + seeded watershed (2D and 3D) + slice tracking.

On a volume the size of Lucchi++ (165 x 768 x 1024): the training mask turned
into network-like probabilities (``0.05 + 0.9 * mask`` blurred by 1 px, plus
Gaussian noise of std 0.12 correlated over ~2 px, clipped to [0, 1]),
or a synthetic volume of ellipsoids when the data are missing.  Prints a
table of wall time and peak memory per stage and writes
``benchmarks/results/postprocess.json`` with machine information.

The tracking is also compared with a straightforward implementation of the
same algorithm that counts overlaps object pair by object pair (one boolean
mask per object, ``logical_and(...).sum()`` for each pair): both run side by
side on the same first slices of the 2D instances (the naive one is too slow
for the whole stack) and must give identical labels.

Usage::

    nice python benchmarks/bench_postprocess.py [--naive-slices 8] [--quick]

Goal on 2 CPU cores: the whole 2D chain < 30 s and < 4 GB peak.  Every
stage runs on one core; on a shared machine compare the CPU seconds (process
time), which the load of other jobs does not inflate, and the load average
recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MASK = Path(os.environ.get("EMSEG_DATA", REPO.parent / "shared" / "data")) / (
    "lucchi_pp_train_mask.tif"
)
SHAPE = (165, 768, 1024)
EDGE_SIGMA = 1.0  # px, soft object borders
NOISE_STD = 0.12  # std of the added noise
NOISE_CORR = 2.0  # px, spatial correlation of the noise


# ------------------------------------------------------------------ memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample the resident set size every few ms while the block runs."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# -------------------------------------------------------------------- data
def load_probabilities(seed: int = 0) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(seed)
    if MASK.exists():
        import tifffile

        mask = tifffile.imread(MASK)
        source = str(MASK)
    else:  # synthetic stand-in: random ellipsoids
        mask = np.zeros(SHAPE, dtype=np.uint8)
        zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
        for _ in range(150):
            c = rng.uniform((0, 0, 0), SHAPE)
            r = rng.uniform((8, 10, 10), (40, 35, 35))
            sl = tuple(
                slice(max(int(ci - ri), 0), min(int(ci + ri) + 1, s))
                for ci, ri, s in zip(c, r, SHAPE, strict=True)
            )
            d = sum(((g[s] - ci) / ri) ** 2 for g, s, ci, ri in zip((zz, yy, xx), sl, c, r, strict=True))
            mask[sl] |= (d <= 1).astype(np.uint8)
        source = "synthetic ellipsoids"
    # network-like probabilities: soft edges and spatially correlated noise
    prob = np.empty(mask.shape, dtype=np.float32)
    for z in range(mask.shape[0]):  # slab-wise to keep the peak low
        p = ndi.gaussian_filter(0.05 + 0.9 * mask[z].astype(np.float32), EDGE_SIGMA)
        noise = ndi.gaussian_filter(rng.standard_normal(p.shape, dtype=np.float32), NOISE_CORR)
        p += noise * np.float32(NOISE_STD / noise.std())
        prob[z] = np.clip(p, 0.0, 1.0)
    return prob, source


# ---------------------------------------------------------- naive tracking
def naive_track(labels: np.ndarray, iou_threshold: float, max_gap: int, min_slices: int):
    """Same algorithm as ``track_slices``, overlaps counted object pair by object pair."""
    nz = labels.shape[0]
    first: list[int] = []
    last: list[int] = []
    per_slice: list[dict[int, int]] = []
    window: deque = deque(maxlen=max_gap + 1)
    for z in range(nz):
        s = labels[z]
        ids = [int(i) for i in np.unique(s) if i != 0]
        masks = {i: s == i for i in ids}
        track = dict.fromkeys(ids, -1)
        for pz, pmasks, ptrack in reversed(window):
            todo = [i for i in ids if track[i] < 0]
            cand = [j for j in pmasks if last[ptrack[j]] == pz]
            if not todo or not cand:
                continue
            iou = np.zeros((len(todo), len(cand)))
            for a, i in enumerate(todo):
                for b, j in enumerate(cand):
                    inter = np.logical_and(masks[i], pmasks[j]).sum()
                    if inter:
                        iou[a, b] = inter / np.logical_or(masks[i], pmasks[j]).sum()
            iou[iou < iou_threshold] = 0
            r, c = linear_sum_assignment(iou, maximize=True)
            for a, b in zip(r, c, strict=True):
                if iou[a, b] > 0:
                    t = ptrack[cand[b]]
                    track[todo[a]] = t
                    last[t] = z
        for i in ids:
            if track[i] < 0:
                track[i] = len(first)
                first.append(z)
                last.append(z)
        window.append((z, masks, track))
        per_slice.append(track)
    keep = [(lt - ft + 1) >= min_slices for ft, lt in zip(first, last, strict=True)]
    final = np.zeros(len(first), dtype=np.uint32)
    final[np.flatnonzero(keep)] = np.arange(1, sum(keep) + 1)
    out = np.zeros(labels.shape, dtype=np.uint32)
    for z in range(nz):
        for i, t in per_slice[z].items():
            out[z][labels[z] == i] = final[t]
    return out


# -------------------------------------------------------------------- main
def machine_info() -> dict:
    import scipy
    import skimage

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": list(os.getloadavg()),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--naive-slices", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="first 24 slices only")
    parser.add_argument("--out", default=str(HERE / "results" / "postprocess.json"))
    args = parser.parse_args(argv)

    from napari_emseg.postprocess import seeded_watershed, threshold, zfilter
    from napari_emseg.tracking import track_slices

    t0 = time.perf_counter()
    prob, source = load_probabilities()
    if args.quick:
        prob = prob[:24].copy()
    load_s = time.perf_counter() - t0
    base = _rss_bytes()
    rows: list[dict] = []

    def stage(name: str, fn):
        with PeakRSS() as m:
            result = fn()
        rows.append(
            {
                "stage": name,
                "seconds": round(m.seconds, 3),
                "cpu_seconds": round(m.cpu_seconds, 3),
                "peak_rss_gb": round(m.peak / 1024**3, 3),
                "stage_extra_gb": round((m.peak - m.start) / 1024**3, 3),
            }
        )
        print(
            f"  {name:<32} {m.seconds:8.2f} s (cpu {m.cpu_seconds:7.2f} s)  "
            f"peak RSS {m.peak / 1024**3:6.2f} GB",
            flush=True,
        )
        return result

    print(f"input {prob.shape} float32 from {source} (made in {load_s:.1f} s)")
    chain_peak = PeakRSS()
    with chain_peak:
        pz = stage("zfilter (size 3, z)", lambda: zfilter(prob, 3, "z"))
        mask = stage("threshold 0.5", lambda: threshold(pz, 0.5))
        lab2 = stage("seeded watershed 2D (hmaxima)", lambda: seeded_watershed(mask, dims=2))
        tracked = stage(
            "track_slices (iou .3, gap 1)",
            lambda: track_slices(lab2, iou_threshold=0.3, max_gap=1, min_slices=2),
        )
    chain_s = sum(r["seconds"] for r in rows)
    chain_cpu = sum(r["cpu_seconds"] for r in rows)
    del tracked
    lab3 = stage(
        "seeded watershed 3D (hmaxima)", lambda: seeded_watershed(mask, dims=3, spacing=(1, 1, 1))
    )
    n3 = int(lab3.max())
    del lab3

    n = min(args.naive_slices, lab2.shape[0])
    sub = np.ascontiguousarray(lab2[:n])
    fast = stage(
        f"track_slices, first {n} slices",
        lambda: track_slices(sub, iou_threshold=0.3, max_gap=1, min_slices=2),
    )
    naive = stage(
        f"naive per-pair tracking, {n} sl.",
        lambda: naive_track(sub, iou_threshold=0.3, max_gap=1, min_slices=2),
    )
    same = bool(np.array_equal(fast, naive))
    ratio = rows[-1]["cpu_seconds"] / max(rows[-2]["cpu_seconds"], 1e-9)
    objs_per_slice = float(np.mean([np.unique(s).size - 1 for s in sub]))

    print()
    print(f"{'stage':<36} {'wall (s)':>9} {'cpu (s)':>9} {'peak RSS (GB)':>14}")
    for r in rows:
        print(
            f"{r['stage']:<36} {r['seconds']:>9.2f} {r['cpu_seconds']:>9.2f} "
            f"{r['peak_rss_gb']:>14.2f}"
        )
    print(
        f"2D chain (zfilter+threshold+watershed+tracking): {chain_s:.1f} s wall, "
        f"{chain_cpu:.1f} s cpu, "
        f"peak RSS {chain_peak.peak / 1024**3:.2f} GB (input + outputs held; "
        f"process before chain {base / 1024**3:.2f} GB)"
    )
    print(
        f"tracking speed-up vs naive per-pair: {ratio:.0f}x on {n} slices "
        f"({objs_per_slice:.0f} objects/slice), identical output: {same}"
    )
    result = {
        "benchmark": "postprocess",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "input": {
            "shape": list(prob.shape),
            "source": source,
            "edge_sigma_px": EDGE_SIGMA,
            "noise_std": NOISE_STD,
            "noise_correlation_px": NOISE_CORR,
        },
        "stages": rows,
        "chain_2d_seconds": round(chain_s, 2),
        "chain_2d_cpu_seconds": round(chain_cpu, 2),
        "loadavg_at_end": list(os.getloadavg()),
        "chain_2d_peak_rss_gb": round(chain_peak.peak / 1024**3, 3),
        "rss_before_chain_gb": round(base / 1024**3, 3),
        "objects_2d": int(lab2.max()),
        "objects_3d_watershed": n3,
        "tracking_vs_naive": {
            "slices": n,
            "objects_per_slice": objs_per_slice,
            "speedup": round(ratio, 1),
            "identical": same,
        },
        "goal": {"chain_seconds": 30, "peak_gb": 4},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
