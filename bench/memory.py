"""Peak memory of one benchmark mode: GPU (``torch.cuda`` peak statistics) and host (resident set).

The host peak is reset between modes by writing ``5`` to ``/proc/self/clear_refs`` (Linux), after
returning freed heap memory to the OS (``malloc_trim``), so one process can measure every mode
without an earlier mode's peak masking a later one. Where the reset is not possible the host
figure is the growth of the process's lifetime peak, flagged as ``host_peak_exact: false``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import re
import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """``start()`` before a mode, ``stop()`` after it: peaks above the level at ``start()``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.host_exact = False
        self._host_base = 0
        self._gpu_base = 0

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._gpu_base = torch.cuda.memory_allocated(self.device)
        self.host_exact = _reset_host_peak()
        if self.host_exact:
            self._host_base = (_status_kib("VmRSS") or 0) * 1024
        else:
            self._host_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> dict[str, int | bool | None]:
        """``gpu_peak_bytes`` (None on CPU), ``host_peak_bytes`` and whether the host figure is exact."""
        gpu: int | None = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            gpu = torch.cuda.max_memory_allocated(self.device) - self._gpu_base
        if self.host_exact:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "gpu_peak_bytes": gpu,
            "host_peak_bytes": max(0, peak - self._host_base),
            "host_peak_exact": self.host_exact,
        }
