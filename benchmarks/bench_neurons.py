"""Benchmark: neurons from membranes — accuracy on ISBI 2012, speed, FlyEM FIB-SEM.

1. **ISBI 2012, held-back sections 25-29.**  The bundled ``membrane-2d``
   model (trained on sections 0-24) predicts sections 20-29 of
   ``isbi2012_train_image.tif``.  Ground-truth cells: in each section, the
   connected components (4-connectivity) of ``membrane == 0`` in
   ``isbi2012_train_membrane.tif``; membrane pixels are 0 and left out of
   every score.  The segmentation parameters (threshold, h) are chosen on
   sections 20-24 (lowest mean adapted Rand error over a fixed grid) and only
   then applied to 25-29; the engine defaults are scored too.  Side by side,
   the classic baseline: connected components of ``prob < t`` per section
   (``t`` also chosen on 20-24).  Scores are means over the sections (2D,
   ISBI style): adapted Rand error, VOI split/merge, V_rand, V_info.
2. **Speed and memory** of :func:`segment_neurons` (2D + tracking) on the
   30 x 512 x 512 probability map of the whole ISBI stack: wall and CPU time,
   peak of numpy allocations (tracemalloc); and ``emseg segment
   --from-membranes`` on the same map saved as TIFF, in a subprocess (wall
   time and its peak resident memory).  Goal: < 30 s, < 2 GB on 2 cores.
3. **FlyEM FIB-SEM** (optional, ``--flyem``): ``membrane-2d`` on every
   z-slice, 3D watershed (isotropic voxels); parameters chosen on z 150-199,
   scored on the held-back last 50 slices (z 200-249) against the neuron ids
   (0 = unassigned, left out).

Writes ``benchmarks/results/neurons.json`` with the machine's name.  Run with
``OMP_NUM_THREADS=1`` on a shared machine::

    OMP_NUM_THREADS=1 python benchmarks/bench_neurons.py [--flyem]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = Path(os.environ.get("EMSEG_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(HERE))

from bench_postprocess import machine_info  # noqa: E402

from napari_emseg.metrics import evaluate  # noqa: E402
from napari_emseg.neurons import segment_neurons  # noqa: E402

TRAIN, HELD_BACK = slice(20, 25), slice(25, 30)  # ISBI sections
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
HS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)
FIXED = {"min_distance": 4.0, "min_size": 50}


# -------------------------------------------------------------------- data
MODEL = {"name": "membrane-2d"}  # the boundary model (--model)


def predict(images: np.ndarray, planes: bool = False) -> np.ndarray:
    """Membrane probabilities of the bundled 2D model, slice by slice (1 thread).

    ``planes``: also along y and x (mean of the three sectionings, isotropic data).
    """
    import torch

    from napari_emseg.models.zoo import load_model
    from napari_emseg.predict import predict_planes, predict_volume

    torch.set_num_threads(1)
    model = load_model(MODEL["name"])
    if planes:
        return predict_planes(images, model, device="cpu")
    return predict_volume(images, model, device="cpu")


def isbi_cells(membrane: np.ndarray) -> np.ndarray:
    """Ground-truth cells: per section, 4-connected components of the non-membrane pixels."""
    out = np.zeros(membrane.shape, np.uint32)
    for z in range(membrane.shape[0]):
        out[z] = ndi.label(membrane[z] == 0)[0]
    return out


def slice_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Means over the sections of ARAND, VOI split/merge, V_rand and V_info."""
    mean = evaluate(labels, truth, segmentation=True, per_slice=True)["slice_mean"]
    return {k: round(float(v), 4) for k, v in mean.items()}


def components_baseline(prob: np.ndarray, t: float) -> np.ndarray:
    """Classic baseline: connected components of ``prob < t`` in each section."""
    out = np.zeros(prob.shape, np.uint32)
    for z in range(prob.shape[0]):
        out[z] = ndi.label(prob[z] < t)[0]
    return out


# ------------------------------------------------------------ 1. accuracy
def isbi_accuracy(prob: np.ndarray, truth: np.ndarray) -> dict:
    """Choose on sections 20-24 (indices 0-4 here), score on 25-29 (5-9)."""
    train_p, train_t = prob[:5], truth[:5]
    held_p, held_t = prob[5:], truth[5:]
    grid = []
    for t, h in itertools.product(THRESHOLDS, HS):
        labels = segment_neurons(train_p, threshold=t, h=h, track=False, **FIXED)
        grid.append({"threshold": t, "h": h, **slice_scores(labels, train_t)})
    best = min(grid, key=lambda r: r["are"])
    chosen = {"threshold": best["threshold"], "h": best["h"], **FIXED}
    base = [(t, slice_scores(components_baseline(train_p, t), train_t)["are"])
            for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    base_t = min(base, key=lambda r: r[1])[0]
    held = {
        "chosen_on_20_24": slice_scores(segment_neurons(held_p, **chosen), held_t),
        "engine_defaults": slice_scores(segment_neurons(held_p), held_t),
        "baseline_components": slice_scores(components_baseline(held_p, base_t), held_t),
    }
    ratio = held["baseline_components"]["are"] / max(held["chosen_on_20_24"]["are"], 1e-9)
    return {
        "ground_truth": "per section: 4-connected components of membrane == 0 in "
                        "isbi2012_train_membrane.tif; membrane pixels = 0, left out",
        "chosen_parameters": chosen, "baseline_threshold": base_t,
        "train_20_24": {"grid": grid, "best": best},
        "held_back_25_29": held,
        "baseline_are_over_ours": round(ratio, 2),
    }


# ------------------------------------------------------------ 2. speed
def engine_speed(prob: np.ndarray) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    labels = segment_neurons(prob)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tracemalloc.start()
    segment_neurons(prob)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"shape": list(prob.shape), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_numpy_mb": round(peak / 2**20, 1), "neurites": int(labels.max()),
            "input_mb": round(prob.nbytes / 2**20, 1)}


def cli_speed(prob: np.ndarray) -> dict:
    """``emseg segment --from-membranes`` in a subprocess: wall time and peak RSS."""
    import tifffile

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "membranes.tif", Path(tmp) / "neurites.tif"
        tifffile.imwrite(src, prob)
        cmd = [sys.executable, "-m", "napari_emseg.cli", "segment", str(src), str(out),
               "--from-membranes", "--quiet"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"command": "emseg segment membranes.tif neurites.tif --from-membranes",
            "wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1),
            "stdout": done.stdout.strip()}


# ------------------------------------------------------------ 3. FlyEM
def flyem(budget_s: float = 180.0, planes: bool = False) -> dict:
    import tifffile

    t_start = time.perf_counter()
    image = tifffile.imread(DATA / "flyem_fibsem_image.tif")[150:250]
    truth = tifffile.imread(DATA / "flyem_fibsem_neurons.tif")[150:250]
    prob = predict(image, planes)
    tune_p, tune_t, held_p, held_t = prob[:50], truth[:50], prob[50:], truth[50:]
    grid = []
    for t, h in itertools.product((0.5, 0.7), (2.0, 4.0, 6.0)):
        if time.perf_counter() - t_start > budget_s:
            return {"skipped": f"over the {budget_s:.0f} s budget while tuning"}
        seg = evaluate(segment_neurons(tune_p, dims=3, threshold=t, h=h, **FIXED), tune_t,
                       segmentation=True)["segmentation"]
        grid.append({"threshold": t, "h": h, "are": round(seg["adapted_rand"]["error"], 4)})
    best = min(grid, key=lambda r: r["are"])
    t0 = time.perf_counter()
    labels = segment_neurons(held_p, dims=3, threshold=best["threshold"], h=best["h"], **FIXED)
    seconds = time.perf_counter() - t0
    seg = evaluate(labels, held_t, segmentation=True)["segmentation"]
    tracked = evaluate(segment_neurons(held_p, threshold=best["threshold"], h=best["h"],
                                       **FIXED), held_t, segmentation=True)["segmentation"]
    return {
        "held_back": "z 200-249 (parameters chosen on z 150-199)", "grid_150_199": grid,
        "chosen": {"threshold": best["threshold"], "h": best["h"], **FIXED},
        "dims3": _round(seg), "dims2_tracked": _round(tracked),
        "segment_seconds_dims3": round(seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "model": MODEL["name"], "planes": "xy, xz, yz averaged" if planes else "xy",
    }


def _round(obj):
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return round(obj, 4) if isinstance(obj, float) else obj


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    import tifffile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flyem", action="store_true", help="also the FlyEM volume (< 3 min)")
    ap.add_argument("--model", default="membrane-2d", help="bundled boundary model")
    ap.add_argument("--planes", action="store_true",
                    help="FlyEM: predict xy, xz and yz sections and average them")
    ap.add_argument("--out", default=str(HERE / "results" / "neurons.json"))
    args = ap.parse_args(argv)
    MODEL["name"] = args.model

    result: dict = {"benchmark": "neurons", "model": args.model, "planes": args.planes,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "machine": {"name": platform.node(), **machine_info(),
                                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}}
    images = tifffile.imread(DATA / "isbi2012_train_image.tif")
    membrane = tifffile.imread(DATA / "isbi2012_train_membrane.tif")
    t0 = time.perf_counter()
    prob = predict(images)  # all 30 sections: 20-29 are scored, all 30 are timed
    result["predict_seconds_30_sections"] = round(time.perf_counter() - t0, 1)

    result["isbi2012"] = isbi_accuracy(prob[20:30], isbi_cells(membrane[20:30]))
    held = result["isbi2012"]["held_back_25_29"]
    print("ISBI 2012 held-back 25-29 (mean over sections):")
    for name, s in held.items():
        print(f"  {name:>20}: ARAND {s['are']:.4f}  VOI split {s['voi_split']:.3f} merge "
              f"{s['voi_merge']:.3f}  V_rand {s['v_rand']:.4f}  V_info {s['v_info']:.4f}")
    print(f"  chosen on 20-24: {result['isbi2012']['chosen_parameters']}; baseline ARAND / "
          f"ours = {result['isbi2012']['baseline_are_over_ours']}")

    result["speed_engine"] = engine_speed(prob)
    result["speed_cli"] = cli_speed(prob)
    print(f"segment_neurons {tuple(prob.shape)}: {result['speed_engine']['wall_s']} s, "
          f"numpy peak {result['speed_engine']['peak_numpy_mb']} MB; CLI "
          f"{result['speed_cli']['wall_s']} s, peak RSS {result['speed_cli']['peak_rss_mb']} MB")

    if args.flyem:
        result["flyem"] = flyem(planes=args.planes)
        print("FlyEM:", json.dumps(result["flyem"].get("dims3", result["flyem"])))
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
