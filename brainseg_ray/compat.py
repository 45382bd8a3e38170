"""The one place that makes torchvision importable beside a CPU build of torch.

PyPI's torchvision wheel is built for CUDA. Beside CPU torch its compiled ops fail to load and
torchvision then registers fake kernels for `nms`/`qnms` without their schemas, so
`import torchvision` (and with it timm and segmentation_models_pytorch) raises
"operator torchvision::nms does not exist". Defining the two schemas first lets the import
succeed; the compiled ops themselves stay unavailable (this project does not use them).
Where torchvision's ops load normally this does nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import threading

_lock = threading.Lock()
_library = None  # keeps the schema definitions registered for the life of the process


def ensure_torchvision_importable() -> None:
    """Call before the first `import torchvision` / timm / smp in a process. Idempotent."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    with _lock:
        if _library is not None:
            return
        if _compiled_ops_load(os.path.dirname(spec.origin), torch):
            return
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library = library


def _compiled_ops_load(package_dir: str, torch) -> bool:
    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(
        os.path.join(package_dir, "_C*.pyd")
    ):
        try:
            torch.ops.load_library(path)
            return hasattr(torch.ops.torchvision, "nms")
        except (OSError, RuntimeError):
            return False
    return False
