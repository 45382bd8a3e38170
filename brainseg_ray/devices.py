"""Which device and which arithmetic: one answer for training, evaluation and inference.

`precision="auto"` means AMP on a GPU (bf16 where the GPU supports it, else fp16 with a gradient
scaler) and bf16 autocast on a CPU with native bf16 (AMX or AVX-512 BF16), where it measured about
2x faster than fp32 here; fp32 elsewhere, since emulated bf16 on older CPUs is slower than fp32.

Inference runs on one of two backends. `backend="auto"` means torch on a GPU and ONNX Runtime
(float32) on a CPU, unless bf16 is asked for by name (only torch has it). On a 2-core Xeon with
AMX, per 256-px slice of a U-Net on EfficientNet-Lite0, a bare loop took 21 ms in torch bf16, 32 ms
in ONNX Runtime and 40-60 ms in torch fp32; but inside a Serve replica a one-slice forward pass took
58 ms in torch bf16 and 36 ms in ONNX Runtime, and the bulk job ran 23 slices/s with either. On a
2-core AVX2 EPYC without bf16: ONNX Runtime 45-49 ms, torch fp32 77-99 ms.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BACKENDS = ("auto", "torch", "onnxruntime")


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


def resolve_backend(backend: str, device: torch.device, precision: str) -> str:
    """"auto" -> "torch" or "onnxruntime" for a resolved device and the precision as asked (see
    above); the others are checked and returned. ONNX Runtime computes in float32 on a CPU only."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torch" if device.type == "cuda" or precision == "bf16" else "onnxruntime"
    if backend == "onnxruntime" and device.type == "cuda":
        raise ValueError("backend onnxruntime runs on the CPU here; use backend torch (or auto) on a GPU")
    return backend


def inference_batch_size(batch_size: int | None, device: torch.device, backend: str = "torch") -> int:
    """Slices per forward pass: the given size, else 16 on a GPU, 2 for torch on a CPU and 4 for
    ONNX Runtime. For torch on the CPU large batches only cost: each activation map of a batch of
    16 is past glibc's mmap threshold, so every forward pass faults its memory in afresh
    (unet-resnet34 here: 9.3 slices/s at batch 2, 7.5 at batch 16, a fifth of the CPU time in the
    kernel). ONNX Runtime keeps its own memory arena: the same time per slice from 2 to 8."""
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return batch_size
    if device.type == "cuda":
        return 16
    return 4 if backend == "onnxruntime" else 2


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
