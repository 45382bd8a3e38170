"""The torchvision work-around: makes smp importable beside CPU torch, and is a no-op otherwise."""

from __future__ import annotations

import subprocess
import sys


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_segmentation_models_import_after_the_work_around():
    result = python(
        "from brainseg_ray.compat import ensure_torchvision_importable as e; e(); e();"
        "import segmentation_models_pytorch as smp, torch;"
        "m = smp.Unet('resnet18', encoder_weights=None, classes=1);"
        "print(tuple(m(torch.zeros(1, 3, 64, 64)).shape))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 1, 64, 64)"


def test_no_op_when_torchvision_is_already_imported_or_its_ops_load():
    # When torchvision's compiled ops load (a matching torch), nothing is defined; here we can at
    # least check the decision is taken from the ops themselves, not from the torch build name.
    result = python(
        "import brainseg_ray.compat as c, torch, importlib.util, os;"
        "d = os.path.dirname(importlib.util.find_spec('torchvision').origin);"
        "loads = c._compiled_ops_load(d, torch);"
        "c.ensure_torchvision_importable();"
        "print(loads, c._library is None)"
    )
    assert result.returncode == 0, result.stderr
    loads, untouched = result.stdout.split()
    assert untouched == loads  # schemas defined exactly when the ops did not load
