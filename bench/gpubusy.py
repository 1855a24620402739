"""How busy a GPU was while a block ran: whether a benchmark's mode is bound by the GPU's kernels or
by the host that feeds them, without a profiler's own cost.

:class:`GpuBusy` runs ``nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits
-lms 100`` beside the block: the driver's share of each sampling period in which a kernel was
running, read every 100 ms. The mean over the block is its busy percentage: ≈ 100 means the GPU
was the limit (making the host faster cannot help), well below means the GPU waited for the host
(launches, Python, a synchronisation). The driver's sampling period is 1/6 s to 1 s depending on
the product, so blocks shorter than a few seconds get few samples (``samples`` says how many).
Off CUDA, or without ``nvidia-smi``, nothing runs and :attr:`GpuBusy.percent` stays None.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from types import TracebackType

import torch

SAMPLE_MS = 100
NVIDIA_SMI = "nvidia-smi"


def _gpu_id(device: torch.device) -> str:
    """nvidia-smi's ``--id`` of ``device``: its UUID (CUDA's and nvidia-smi's index orders can
    differ), else its index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else str(index)


class GpuBusy:
    """``with GpuBusy(device) as busy: ...`` then ``busy.percent`` (None when not measured) and
    ``busy.samples`` (module docstring). ``gpu_id``: nvidia-smi's ``--id`` (default: ``device``'s)."""

    def __init__(self, device: torch.device, gpu_id: str | None = None) -> None:
        self.device = device
        self.gpu_id = gpu_id
        self.percent: float | None = None
        self.samples = 0
        self._values: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        program = shutil.which(NVIDIA_SMI)
        if self.device.type != "cuda" or program is None:
            return self
        gpu_id = self.gpu_id if self.gpu_id is not None else _gpu_id(self.device)
        command = [program, f"--id={gpu_id}", "--query-gpu=utilization.gpu"]
        command += ["--format=csv,noheader,nounits", f"-lms={SAMPLE_MS}"]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
        )
        self._reader = threading.Thread(target=self._read, name="gpu-busy", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                self._values.append(float(line.strip()))
            except ValueError:  # "[N/A]" or a message: not a sample
                continue

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.samples = len(self._values)
        self.percent = sum(self._values) / self.samples if self.samples else None
