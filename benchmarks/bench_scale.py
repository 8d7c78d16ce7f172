"""Blockwise prediction at growing volume sizes: peak memory and throughput.

Scaled down from the issue (1 GB -> 8 GB) to fit a 2-core development machine:
synthetic uint8 zarr volumes of ``--small`` and 8x that size (default
64 MiB -> 512 MiB, uncompressed; ``--small-mib 128`` gives 128 MiB -> 1 GiB), predicted with a cheap
pointwise "model" (logits = 4x - 2, so CPU time goes to the tiling, I/O and
blending rather than to convolutions) into a uint8 zarr.

Runs, each in a fresh child process (``ru_maxrss`` = that run's peak RSS;
the RSS after imports is subtracted and reported separately):

* ``blockwise``   — ``predict_blockwise`` on local threads, small and 8x volume;
* ``inmemory``    — read the small volume into numpy, ``predict_volume``,
  write the zarr: the baseline for throughput;
* ``cluster1`` / ``cluster2`` — ``predict_blockwise`` on a ``LocalCluster`` of
  1 and 2 workers (threads_per_worker=1, torch 1 thread per worker);
* ``unet``        — a real 2D U-Net (depth 4, width 16, random weights) on an
  8x512x512 volume, blockwise (8x256x256 blocks) vs in memory.

Every child uses one torch thread (the machine is shared), so ``cluster2``
can use two cores where the others use one.  Blockwise runs use the default
halo (0, 64, 64): with 512² blocks a block plus halo is 640² = 3x3 tiles of
256² (overlap 0.25), against 2.5x2.5 tiles per 512² in memory, so about
0.7x the in-memory throughput is the expected cost of the halo.

Usage::

    nice python benchmarks/bench_scale.py [--small-mib 128] [--factor 8]

Writes ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = (64, 512, 512)


def pointwise(x):
    """Cheap per-voxel model: logits = 4x - 2."""
    return x * 4.0 - 2.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_volume(path: str, shape: tuple[int, int, int]) -> None:
    """A compressible synthetic EM-like uint8 volume, written slab by slab."""
    import zarr

    arr = zarr.open_array(path, mode="w", shape=shape, chunks=BLOCK, dtype=np.uint8)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    base = (96 + 64 * np.sin(yy / 37.0) * np.cos(xx / 53.0)).astype(np.int16)
    for z0 in range(0, shape[0], BLOCK[0]):
        n = min(BLOCK[0], shape[0] - z0)
        slab = base[None] + rng.integers(-8, 9, size=(n, 1, shape[2]), dtype=np.int16)
        arr[z0 : z0 + n] = np.clip(slab + 4 * (z0 // BLOCK[0]), 0, 255).astype(np.uint8)


def child(mode: str, src: str, out: str, workers: int) -> dict:
    import torch

    from napari_emseg.blockwise import predict_blockwise
    from napari_emseg.predict import predict_volume

    kwargs = dict(dims=2, normalization={"mode": "minmax"}, activation="sigmoid")
    model = pointwise
    if mode.startswith("unet"):
        from napari_emseg.models.unet import UNet

        torch.manual_seed(0)
        model = UNet(dims=2, depth=4, width=16).eval()
        kwargs = {}
    import zarr

    # one torch thread per process: stable numbers on a shared 2-core machine, and the
    # 2-worker cluster then really uses two cores
    torch.set_num_threads(1)
    shape = tuple(zarr.open_array(src, mode="r").shape)
    base = _rss_mib()
    t0 = time.perf_counter()
    if mode in ("inmemory", "unet_inmemory"):
        from napari_emseg.io import write_volume

        vol = zarr.open_array(src, mode="r")[:]
        prob = predict_volume(vol, model, **kwargs)
        write_volume(out, np.round(prob * 255).astype(np.uint8), chunks=BLOCK)
    elif mode.startswith("cluster"):
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            t0 = time.perf_counter()  # cluster start-up not counted
            predict_blockwise(src, out, model, block_shape=BLOCK, client=client,
                              dtype="uint8", **kwargs)
    else:
        block = BLOCK if mode == "blockwise" else (8, 256, 256)
        # default halo: (context, patch // 4) = (0, 64, 64) for these 2D models
        predict_blockwise(src, out, model, block_shape=block, dtype="uint8", **kwargs)
    seconds = time.perf_counter() - t0
    mib = float(np.prod(shape)) / 2**20
    return {"mode": mode, "shape": list(shape), "input_mib": mib, "seconds": seconds,
            "throughput_mib_s": mib / seconds, "rss_after_imports_mib": base,
            "peak_rss_mib": _peak_mib(), "peak_minus_imports_mib": _peak_mib() - base,
            "torch_threads": torch.get_num_threads()}


def run_child(mode: str, src: str, out: str, workers: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--src", src, "--out", out,
           "--workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {mode:14s} {result['shape']}  {result['seconds']:7.1f} s  "
          f"{result['throughput_mib_s']:6.2f} MiB/s  peak RSS {result['peak_rss_mib']:7.0f} MiB "
          f"(+{result['peak_minus_imports_mib']:.0f} over imports)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small-mib", type=int, default=64)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--child")
    parser.add_argument("--src")
    parser.add_argument("--out")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.src, args.out, args.workers)))
        return

    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "load_avg_start": os.getloadavg()},
                     "block_shape": list(BLOCK), "runs": []}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        small_z = max(BLOCK[0], args.small_mib)  # 1024 x 1024 slices of 1 MiB each
        sizes = {"small": (small_z, 1024, 1024), "large": (small_z * args.factor, 1024, 1024)}
        for name, shape in sizes.items():
            src = f"{tmp}/{name}.zarr"
            t0 = time.perf_counter()
            make_volume(src, shape)
            print(f"made {name} {shape} in {time.perf_counter() - t0:.1f} s", flush=True)

        def out(name: str) -> str:
            return f"{tmp}/out_{name}.zarr"

        runs = results["runs"]
        runs.append(run_child("inmemory", f"{tmp}/small.zarr", out("mem")))
        runs.append(run_child("blockwise", f"{tmp}/small.zarr", out("bs")))
        runs.append(run_child("blockwise", f"{tmp}/large.zarr", out("bl")))
        for w in (1, 2):
            runs.append(run_child(f"cluster{w}", f"{tmp}/small.zarr", out(f"c{w}"), w))
        unet_src = f"{tmp}/unet.zarr"
        make_volume(unet_src, (8, 512, 512))
        runs.append(run_child("unet_inmemory", unet_src, out("um")))
        runs.append(run_child("unet_blockwise", unet_src, out("ub")))

    by = {(r["mode"], r["shape"][0]): r for r in results["runs"]}
    small, large = sizes["small"][0], sizes["large"][0]
    bs, bl, mem = by[("blockwise", small)], by[("blockwise", large)], by[("inmemory", small)]
    c1, c2 = by[("cluster1", small)], by[("cluster2", small)]
    um, ub = by[("unet_inmemory", 8)], by[("unet_blockwise", 8)]
    results["summary"] = {
        "peak_rss_large_over_small": bl["peak_rss_mib"] / bs["peak_rss_mib"],
        "peak_above_imports_large_over_small":
            bl["peak_minus_imports_mib"] / bs["peak_minus_imports_mib"],
        "throughput_blockwise_over_inmemory": bs["throughput_mib_s"] / mem["throughput_mib_s"],
        "throughput_large_over_small": bl["throughput_mib_s"] / bs["throughput_mib_s"],
        "cluster2_over_cluster1": c2["throughput_mib_s"] / c1["throughput_mib_s"],
        "unet_blockwise_over_inmemory": ub["throughput_mib_s"] / um["throughput_mib_s"],
        "inmemory_peak_rss_small_mib": mem["peak_rss_mib"],
    }
    results["machine"]["load_avg_end"] = os.getloadavg()
    path = ROOT / "benchmarks" / "results" / "scale.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
