"""Which devices get a worker, decided in the server without importing torch.

The server never imports torch and never touches a GPU: a CUDA context there
would hold hundreds of MiB on every GPU for nothing, and importing torch
(about 1.4 s) before the workers can start would delay the first job by as
much. The GPU count comes from the CUDA driver itself (``libcuda``'s
``cuInit`` and ``cuDeviceGetCount`` through ctypes: the driver API has no
Python package of its own, and this is all the server needs of it), and
whether the installed torch can use GPUs at all from its version tag
(``+cpu`` builds cannot). Each worker checks its device with torch when it
starts and reports what it found (``worker.py``); what a GPU holds is reported
by its worker too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import re

from ...bridge.errors import KeyframeWorldsError

DEVICE_PATTERN = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def cuda_device_count() -> int:
    """GPUs the CUDA driver shows this process (honours ``CUDA_VISIBLE_DEVICES``); 0 without a driver."""
    names = ["libcuda.so.1", "libcuda.so", "nvcuda.dll", ctypes.util.find_library("cuda")]
    for name in filter(None, names):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
        except AttributeError:
            return 0
        return int(count.value)
    return 0


def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build (PyPI's CPU wheels carry a ``+cpu`` tag)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "+cpu" not in version


def usable_gpu_count() -> int:
    return cuda_device_count() if torch_has_cuda() else 0


def detect_devices() -> list[str]:
    """One worker device per usable CUDA GPU, else the CPU."""
    count = usable_gpu_count()
    return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]


def check_devices(devices: list[str]) -> list[str]:
    """The ``--device`` list, each a device this machine has, named once; raises naming the first that is not."""
    seen: set = set()
    gpus: int | None = None
    for name in devices:
        match = DEVICE_PATTERN.match(name)
        if match is None:
            raise KeyframeWorldsError(f"--device {name}: not a device (the engine's workers run on cpu, cpu:N, cuda or cuda:N)")
        kind, index = match.group(1), int(match.group(2) or 0)
        if kind == "cuda":
            gpus = usable_gpu_count() if gpus is None else gpus
            if gpus == 0:
                raise KeyframeWorldsError(f"--device {name}: no CUDA device is available to this engine "
                                          f"({'no CUDA driver or GPU' if torch_has_cuda() else 'torch is a CPU build'})")
            if index >= gpus:
                raise KeyframeWorldsError(f"--device {name}: this machine has {gpus} CUDA device(s)")
        if (kind, index) in seen:
            raise KeyframeWorldsError(f"--device {name}: named twice (one worker per device)")
        seen.add((kind, index))
    return list(devices)
