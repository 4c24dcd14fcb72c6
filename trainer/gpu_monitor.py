"""GPU utilisation and memory over each phase of a step, sampled by a background thread through NVML.

The driver holds no CUDA context (its roles are Ray actors), so it reads the devices through NVML,
which sees every process on a GPU: vLLM's engine, the teacher and the learner together.
`lap(phase)` closes a phase and returns its peak used memory (GiB, summed over the GPUs this node
shows) and mean utilisation (%). With no GPU or no NVML the monitor is off and laps return {}.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

Reading = tuple[float, float]  # (used GiB summed over GPUs, mean utilisation % over GPUs)


def nvml_reader(index: Optional[int] = None) -> Optional[Callable[[], Reading]]:
    """A function reading GPU `index` (None: every GPU this node shows), or None where there is no NVML or no GPU."""
    try:
        import pynvml
        pynvml.nvmlInit()
        indices = range(pynvml.nvmlDeviceGetCount()) if index is None else [index]
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
    except Exception:  # no driver, no library: nothing to monitor
        return None
    if not handles:
        return None
    try:  # NVML has no utilisation for a MIG-enabled GPU (NotSupported): report NaN there, memory still
        pynvml.nvmlDeviceGetUtilizationRates(handles[0])
        has_util = True
    except Exception:
        has_util = False

    def read() -> Reading:
        used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) / 2**30
        if not has_util:
            return used, float("nan")
        util = sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles)
        return used, float(util)
    return read


class GpuMonitor:
    def __init__(self, read: Optional[Callable[[], Reading]] = None, interval_s: float = 0.05):
        self.read, self.interval_s = read, interval_s
        self._lock = threading.Lock()
        self._reset()
        self._stop = threading.Event()
        self._thread = None
        if read is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True, name="gpu-monitor")
            self._thread.start()

    @classmethod
    def for_device(cls, device: str) -> "GpuMonitor":
        return cls(nvml_reader() if device == "cuda" else None)

    def _reset(self) -> None:
        self._peak, self._util_sum, self._n = 0.0, 0.0, 0

    def _sample(self) -> None:
        try:
            used, util = self.read()
        except Exception:  # a reading NVML refuses (e.g. utilisation on a MIG-enabled GPU): skip it, never fail the run
            return
        with self._lock:
            self._peak = max(self._peak, used)
            self._util_sum += util
            self._n += 1

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def lap(self, phase: str) -> dict[str, float]:
        """The phase just ended: {gpu/mem_peak_gb/<phase>, gpu/util/<phase>}; starts the next phase."""
        if self.read is None:
            return {}
        self._sample()  # a phase shorter than the interval still gets a reading
        with self._lock:
            out = {} if not self._n else {f"gpu/mem_peak_gb/{phase}": self._peak,
                                          f"gpu/util/{phase}": self._util_sum / self._n}
            self._reset()
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
