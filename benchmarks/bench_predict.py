"""Tiled prediction speed and memory: napari-emseg vs MONAI vs a naive tile loop.

Same model (the bundled ``mito-2d`` if present, else a random-weight U-Net of
the same architecture: 2D, depth 4, width 16, batch norm), same patch (256²)
and overlap (0.25), same input (a stack of real Lucchi++ slices):

* ``emseg``  — :func:`napari_emseg.predict.predict_volume` (includes its own
  normalisation of the raw uint8 stack);
* ``monai``  — ``monai.inferers.sliding_window_inference`` (mode="gaussian",
  the same ``sw_batch_size`` as emseg's batch, under ``torch.inference_mode``)
  on the pre-normalised float32 stack (N=Z images), then a sigmoid;
* ``naive``  — one tile at a time, batch 1, uniform averaging of overlaps.

Timing runs in this process, methods interleaved round by round; the median
of ``--repeats`` runs is reported, as wall time and as process CPU time (the
latter is steadier when other jobs share the machine's cores). Peak memory is measured separately: each method runs once in a
fresh child process (data and model loaded, one warm-up forward) that samples
its RSS every 2 ms in a thread and reports the peak minus the RSS just before
the run (on CUDA also ``torch.cuda.max_memory_allocated``).

Usage::

    python benchmarks/bench_predict.py [--slices 8] [--device cpu] [--repeats 3]

Writes ``benchmarks/results/predict_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lucchi_pp_train_image.tif"
PATCH = (256, 256)
OVERLAP = 0.25
METHODS = ("emseg", "monai", "naive")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_data(args) -> np.ndarray:
    import tifffile

    path = Path(args.data)
    vol = tifffile.imread(path, key=range(args.z0, args.z0 + args.slices))
    vol = vol.reshape(args.slices, *vol.shape[-2:])
    return np.ascontiguousarray(vol[:, : args.height, : args.width])


def load_model(device: str):
    import torch

    from napari_emseg.models import zoo
    from napari_emseg.models.unet import UNet

    if "mito-2d" in zoo.list_models():
        model = zoo.load_model("mito-2d")
        source = "bundled mito-2d"
    else:
        torch.manual_seed(0)
        model = UNet(dims=2, in_channels=1, out_channels=1, depth=4, width=16,
                     norm="batch").eval()
        model.meta = {**zoo.DEFAULT_META, "dims": 2}
        source = "random-weight UNet(2D, depth 4, width 16, batch norm)"
    return model.to(device).eval(), source


def batch_size_for(device: str) -> int:
    from napari_emseg.predict import BATCH_VOXELS

    kind = "cuda" if device.startswith("cuda") else device
    return max(1, BATCH_VOXELS.get(kind, BATCH_VOXELS["cpu"]) // (PATCH[0] * PATCH[1]))


# --------------------------------------------------------------------------- methods


def run_emseg(vol, model, device, batch):
    from napari_emseg.predict import predict_volume

    return predict_volume(vol, model, patch=PATCH, overlap=OVERLAP, device=device,
                          batch_size=batch)


def run_monai(vol, model, device, batch):
    import torch
    from monai.inferers import sliding_window_inference

    from napari_emseg._normalize import normalize

    norm = normalize(vol, model.meta["normalization"])
    x = torch.from_numpy(norm[:, None]).to(device)
    amp = device.startswith("cuda")
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
        y = sliding_window_inference(x, PATCH, batch, model, overlap=OVERLAP, mode="gaussian")
    return torch.sigmoid(y.float())[:, 0].cpu().numpy()


def run_naive(vol, model, device, batch):
    import torch

    from napari_emseg._normalize import normalize
    from napari_emseg.predict import tile_starts

    norm = normalize(vol, model.meta["normalization"])
    out = np.zeros(vol.shape, np.float32)
    count = np.zeros(vol.shape[1:], np.float32)
    ys = tile_starts(vol.shape[1], PATCH[0], OVERLAP)
    xs = tile_starts(vol.shape[2], PATCH[1], OVERLAP)
    for y in ys:
        for x in xs:
            count[y : y + PATCH[0], x : x + PATCH[1]] += 1
    with torch.no_grad():
        for z in range(vol.shape[0]):
            for y in ys:
                for x in xs:
                    tile = torch.from_numpy(norm[z, y : y + PATCH[0], x : x + PATCH[1]].copy())
                    p = torch.sigmoid(model(tile[None, None].to(device)).float())
                    out[z, y : y + PATCH[0], x : x + PATCH[1]] += p[0, 0].cpu().numpy()
    return out / count


RUNNERS = {"emseg": run_emseg, "monai": run_monai, "naive": run_naive}


# --------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_methods(vol, model, device, repeats, methods):
    import torch

    batch = batch_size_for(device)
    with torch.inference_mode():  # warm-up: oneDNN / cuDNN kernels
        model(torch.zeros((batch, 1, *PATCH), device=device))
    times = {m: [] for m in methods}
    cpu_times = {m: [] for m in methods}
    outputs = {}
    for r in range(repeats):
        for m in methods:
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            outputs[m] = RUNNERS[m](vol, model, device, batch)
            _sync(device)
            times[m].append(time.perf_counter() - t)
            cpu_times[m].append(time.process_time() - c)
            print(f"  round {r + 1}: {m:6s} {times[m][-1]:7.2f} s wall, "
                  f"{cpu_times[m][-1]:7.2f} s CPU", flush=True)
    return times, cpu_times, outputs


def child_memory(args, method: str) -> dict:
    """Run ``method`` once in a fresh process; peak RSS (and CUDA peak) in bytes."""
    cmd = [sys.executable, __file__, "--child", method, "--device", args.device,
           "--slices", str(args.slices), "--z0", str(args.z0), "--height", str(args.height),
           "--width", str(args.width), "--data", str(args.data)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class RssSampler:
    """Peak resident memory of this process, sampled every few ms in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.start_rss = self.proc.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def child_main(args) -> None:
    import torch

    vol = load_data(args)
    model, _ = load_model(args.device)
    batch = batch_size_for(args.device)
    with torch.inference_mode():
        model(torch.zeros((batch, 1, *PATCH), device=args.device))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as sampler:
        RUNNERS[args.child](vol, model, args.device, batch)
        _sync(args.device)
    cuda = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    print(json.dumps({"rss_extra": sampler.peak - sampler.start_rss,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "cuda_peak": cuda}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--z0", type=int, default=40)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from napari_emseg.predict import select_device

    args.device = str(select_device(args.device))
    if args.child:
        child_main(args)
        return
    methods = [m for m in args.methods.split(",") if m]
    vol = load_data(args)
    model, source = load_model(args.device)
    name = device_name(args.device)
    print(f"device {args.device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model: {source}")
    print(f"input {vol.shape} {vol.dtype} ({vol.size / 1e6:.1f} Mvoxels), patch {PATCH}, "
          f"overlap {OVERLAP}, batch {batch_size_for(args.device)}")

    times, cpu_times, outputs = time_methods(vol, model, args.device, args.repeats, methods)
    results = {}
    for m in methods:
        med = statistics.median(times[m])
        cpu = statistics.median(cpu_times[m])
        results[m] = {"seconds": times[m], "median_s": med, "voxels_per_s": vol.size / med,
                      "cpu_seconds": cpu_times[m], "median_cpu_s": cpu,
                      "voxels_per_cpu_s": vol.size / cpu}
    if "emseg" in outputs:
        for m in methods:
            if m != "emseg":
                d = np.abs(outputs[m] - outputs["emseg"])
                results[m]["max_abs_diff_vs_emseg"] = float(d.max())
                results[m]["mean_abs_diff_vs_emseg"] = float(d.mean())

    if not args.no_memory:
        for m in methods:
            mem = child_memory(args, m)
            results[m]["peak_rss_extra_mb"] = mem["rss_extra"] / 2**20
            if mem["cuda_peak"] is not None:
                results[m]["cuda_peak_mb"] = mem["cuda_peak"] / 2**20

    ref = results.get("monai")
    print(f"\n{'method':8s} {'s (median)':>10s} {'Mvox/s':>8s} {'speed/MONAI':>11s} "
          f"{'CPU s':>7s} {'CPU-time/MONAI':>14s} {'peak MB':>8s} {'mem/MONAI':>9s}")
    for m in methods:
        r = results[m]
        if ref:
            r["speed_vs_monai"] = r["voxels_per_s"] / ref["voxels_per_s"]
            r["cpu_speed_vs_monai"] = ref["median_cpu_s"] / r["median_cpu_s"]
            if "peak_rss_extra_mb" in r and ref.get("peak_rss_extra_mb"):
                r["memory_vs_monai"] = r["peak_rss_extra_mb"] / ref["peak_rss_extra_mb"]
        mem = r.get("cuda_peak_mb", r.get("peak_rss_extra_mb", float("nan")))
        print(f"{m:8s} {r['median_s']:10.2f} {r['voxels_per_s'] / 1e6:8.3f} "
              f"{r.get('speed_vs_monai', float('nan')):11.2f} {r['median_cpu_s']:7.1f} "
              f"{r.get('cpu_speed_vs_monai', float('nan')):14.2f} {mem:8.0f} "
              f"{r.get('memory_vs_monai', float('nan')):9.2f}")

    import monai

    record = {
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": torch.get_num_threads(),
        "model": source,
        "input": {"file": Path(args.data).name, "shape": list(vol.shape), "z0": args.z0},
        "patch": list(PATCH),
        "overlap": OVERLAP,
        "batch_size": batch_size_for(args.device),
        "repeats": args.repeats,
        "results": results,
    }
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = args.device.split(":")[0]
    path = out_dir / f"predict_{kind}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
