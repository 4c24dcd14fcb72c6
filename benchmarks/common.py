"""Shared pieces of the benchmarks: versions, the device's name, a GPU utilisation sampler, statistics
over timed intervals, and the BENCHMARKS.md row writer."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions(*extra: str) -> dict:
    """python and the versions of torch, transformers and `extra` modules (None where not importable)."""
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", *extra):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # not installed, or fails to import: say so in the row
            out[mod] = None
    return out


def device_name(device: str) -> str:
    """The GPU's name without creating a CUDA context (NVML or nvidia-smi; torch as the last resort)."""
    if device != "cuda":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        import pynvml
        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else name
    except Exception:
        pass
    smi = gpu_query("name")
    if smi:
        return smi
    import torch
    return torch.cuda.get_device_name()


def gpu_query(field: str, index: int = 0) -> Optional[str]:
    """One `nvidia-smi --query-gpu` field of GPU `index` (None where there is no nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def gpu_used_gb(index: int = 0) -> Optional[float]:
    used = gpu_query("memory.used", index)
    try:
        return float(used) / 1024.0 if used is not None else None
    except ValueError:
        return None


def wait_gpu_released(limit_gb: float = 2.0, timeout_s: float = 90.0, index: int = 0) -> Optional[float]:
    """Wait until GPU `index` uses at most `limit_gb` (the last system's engines gone); returns the GiB in use."""
    deadline = time.time() + timeout_s
    used = gpu_used_gb(index)
    while used is not None and used > limit_gb and time.time() < deadline:
        time.sleep(2.0)
        used = gpu_used_gb(index)
    return used


def now_iso() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


class GpuSampler:
    """GPU utilisation (%) and used memory (GiB) of one GPU, sampled every `interval_s` by a background thread.

    Source: NVML through `pynvml` (nvidia-ml-py) where importable, else a streaming
    `nvidia-smi --query-gpu=utilization.gpu,memory.used -lms N`, else nothing (`source` is None).
    NVML's utilisation is the share of the last sample period (1/6 s to 1 s, driver-chosen) in which any
    kernel ran: a busy-ness measure, not FLOP efficiency. Memory is the whole GPU's (every process).
    Timestamps are `time.perf_counter()` of this process, comparable with the phase stamps taken here.
    """

    def __init__(self, interval_s: float = 0.1, index: int = 0):
        self.interval_s, self.index = interval_s, index
        self.samples: list[tuple[float, float, float]] = []  # (t, util %, used GiB)
        self.source: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> "GpuSampler":
        read = self._nvml_reader()
        if read is not None:
            self.source = "nvml"
            self._thread = threading.Thread(target=self._poll, args=(read,), daemon=True, name="gpu-sampler")
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", f"--loop-ms={max(50, int(self.interval_s * 1000))}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True, name="gpu-sampler")
        if self._thread is not None:
            self._thread.start()
        return self

    def _nvml_reader(self):
        from trainer.gpu_monitor import nvml_reader

        read = nvml_reader(self.index)
        if read is None:
            return None

        def util_mem() -> tuple[float, float]:
            used, util = read()
            return util, used
        return util_mem

    def _poll(self, read) -> None:
        while not self._stop.is_set():
            try:
                util, mem = read()
                self.samples.append((time.perf_counter(), util, mem))
            except Exception:  # a failed read drops one sample, not the run
                pass
            self._stop.wait(self.interval_s)

    def _read_smi(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem / 1024.0))  # MiB -> GiB

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def mean_util(self, windows: list[tuple[float, float]]) -> Optional[float]:
        vals = [u for t0, t1 in windows for _, u, _ in self.window(t0, t1)]
        return sum(vals) / len(vals) if vals else None

    def peak_mem_gb(self, t0: float = float("-inf"), t1: float = float("inf")) -> Optional[float]:
        vals = [m for _, _, m in self.window(t0, t1)]
        return max(vals) if vals else None


def interval_overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def append_markdown(path: str, title: str, row: dict, table_header: list[str], table_rows: list[list], notes: list[str]) -> None:
    """A section in the style of the other scripts: heading with date and device, versions, config, a table."""
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Benchmarks\n")
        f.write(f"\n## {title} {row['date']} ({row['device_name']})\n\n")
        f.write(f"versions: {json.dumps(row['versions'])}  \nconfig: {json.dumps(row['config'])}\n\n")
        f.write("| " + " | ".join(table_header) + " |\n|" + "---|" * len(table_header) + "\n")
        for r in table_rows:
            f.write("| " + " | ".join(fmt(v) for v in r) + " |\n")
        for note in notes:
            f.write(f"\n{note}\n")
