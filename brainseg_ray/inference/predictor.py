"""A loaded model artifact that turns uint8 slices into probability maps and masks.

Preprocessing comes from the artifact (models/inputs.py), so evaluation, the batch job and Serve
see exactly what training saw. Device, precision and backend follow devices.py (use_gpu None: GPU
when present; bf16 only on CPUs with native bf16; backend auto: ONNX Runtime in float32 on a CPU
unless bf16 is asked for by name, torch on a GPU). Threads are set here, for both backends, from
the CPUs the process was given.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from brainseg_ray.devices import autocast, inference_batch_size, pick_device, resolve_backend, resolve_precision
from brainseg_ray.models.artifact import ModelArtifact, load_artifact
from brainseg_ray.models.inputs import images_to_tensor, logits_to_probabilities
from brainseg_ray.models.onnx_graph import INPUT_NAME, OUTPUT_NAME, onnx_session, onnxruntime_or_reason
from brainseg_ray.storage import S3Options

log = logging.getLogger(__name__)


class Predictor:
    def __init__(self, artifact: ModelArtifact, *, use_gpu: bool | None = None, precision: str = "auto",
                 channels_last: bool = True, batch_size: int | None = None, threads: int | None = None,
                 backend: str = "auto", spin: bool = True):
        """`threads`: the CPUs to compute on (Ray sets OMP_NUM_THREADS=1 in its workers; an actor
        given N CPUs should use them); None: torch's own count. `spin=False`: idle ONNX Runtime
        threads sleep instead of spinning (a Serve replica between requests)."""
        self.threads = threads
        self.artifact = artifact
        self.metadata = artifact.metadata
        self.device = pick_device(use_gpu)
        self.precision = resolve_precision(precision, self.device)
        self.backend = resolve_backend(backend, self.device, precision)
        self.session = None
        if self.backend == "onnxruntime":
            self.session = self._onnx_session(explicit=backend == "onnxruntime", spin=spin)
        if self.session is not None:
            self.precision = "fp32"
        else:
            self.backend = "torch"
        self.channels_last = channels_last and self.session is None
        self.batch_size = inference_batch_size(batch_size, self.device, self.backend)
        self.normalisation = self.metadata["normalisation"]
        self.input_size = int(self.metadata["input"]["size"])
        self.threshold = float(self.metadata.get("threshold", 0.5))
        self.version = self.metadata.get("version", "")
        model = artifact.model.to(self.device).eval()
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model

    def _onnx_session(self, explicit: bool, spin: bool):
        """The artifact's graph in an ONNX Runtime session; where ORT cannot load, an error when
        it was asked for, else None (torch, after one warning line)."""
        from brainseg_ray.models.onnx_cache import onnx_graph

        _, reason = onnxruntime_or_reason()
        if reason is None:
            try:
                return onnx_session(onnx_graph(self.artifact), self.artifact.weights_file, self.artifact.weights,
                                    self.threads or torch.get_num_threads(), spin=spin)
            except Exception as exc:  # ORT's and the exporter's errors have no common type
                reason = f"the model does not run on onnxruntime ({type(exc).__name__}: {exc})"
        if explicit:
            raise ValueError(f"backend onnxruntime: {reason}")
        log.warning("backend auto: using torch, since %s", reason)
        return None

    @classmethod
    def load(cls, uri: str, s3: S3Options | None = None, **kwargs) -> Predictor:
        return cls(load_artifact(uri, s3), **kwargs)

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N,H,W,3] -> float32 logits [N,1,s,s] at the model's input size (on CPU)."""
        if self.threads:
            # Set per call: Ray Data calls actors from a thread of its own, and OpenMP's thread
            # count belongs to the calling thread.
            torch.set_num_threads(self.threads)
        outputs = []
        for start in range(0, len(images), self.batch_size):
            x = images_to_tensor(images[start:start + self.batch_size], self.normalisation, self.input_size,
                                 self.device, self.channels_last)
            if self.session is not None:
                outputs.append(torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]))
                continue
            with autocast(self.precision, self.device):
                outputs.append(self.model(x).float().cpu())
        if not outputs:
            return torch.zeros((0, 1, self.input_size, self.input_size))
        return torch.cat(outputs)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] -> float32 [N,H,W] tumour probabilities at the slices' own size."""
        logits = self.logits(images)
        return logits_to_probabilities(logits, images.shape[1], images.shape[2]).numpy()

    def masks(self, probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Probabilities -> uint8 {0,1} masks at the artifact's (or the given) threshold."""
        return (probabilities > (self.threshold if threshold is None else threshold)).astype(np.uint8)
