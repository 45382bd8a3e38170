"""Which device and which arithmetic: one answer for training, evaluation and inference.

`precision="auto"` means AMP on a GPU (bf16 where the GPU supports it, else fp16 with a gradient
scaler) and bf16 autocast on a CPU with native bf16 (AMX or AVX-512 BF16), where it measured about
2x faster than fp32 here; fp32 elsewhere, since emulated bf16 on older CPUs is slower than fp32.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(use_gpu: bool | None = None) -> torch.device:
    """cuda when asked for (true) or, with None, when one is visible; cpu with false. Asking for a
    missing GPU is an error."""
    available = torch.cuda.is_available()
    if use_gpu is True and not available:
        raise ValueError("use_gpu is true but no CUDA GPU is visible to this process")
    return torch.device("cuda") if (use_gpu is True or (use_gpu is None and available)) else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> the precision used on `device`; others are checked and returned."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on a CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def inference_batch_size(batch_size: int | None, device: torch.device) -> int:
    """Slices per forward pass: the given size, else 16 on a GPU and 2 on a CPU. On the CPU large
    batches only cost: each activation map of a batch of 16 is past glibc's mmap threshold, so
    every forward pass faults its memory in afresh (unet-resnet34 here: 9.3 slices/s at batch 2,
    7.5 at batch 16, a fifth of the CPU time in the kernel)."""
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return batch_size
    return 16 if device.type == "cuda" else 2


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
