"""What the package asks of the default device: platform, compute capability, SM count."""
from __future__ import annotations

import jax


def default_device():
    """jax.devices()[0], or None when no backend can give a device (tracing for another platform)."""
    try:
        return jax.devices()[0]
    except RuntimeError:
        return None


def compute_capability(device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU device, None for anything else."""
    cc = getattr(device, "compute_capability", None)
    if device is None or device.platform != "gpu" or cc is None:
        return None
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)


def default_compute_capability() -> tuple[int, int] | None:
    return compute_capability(default_device())


def sm_count(default: int) -> int:
    """Streaming multiprocessors of the default device (`default` where it does not say)."""
    return int(getattr(default_device(), "core_count", 0) or 0) or default


def device_kind() -> str:
    device = default_device()
    return "" if device is None else str(device.device_kind)
