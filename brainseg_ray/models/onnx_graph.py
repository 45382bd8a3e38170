"""The artifact's ONNX graph, for ONNX Runtime on CPUs.

`model.onnx` holds the graph only. Its parameters are ONNX external data that point into the
artifact's own weights.safetensors (a safetensors file is a JSON header, then each tensor's raw
little-endian bytes), so the artifact keeps its weights once: a float16 artifact's graph reads the
float16 tensors and casts them to float32 (ONNX Runtime folds those casts when the session
starts, so it computes in float32 like the torch path). Standard ONNX tools open model.onnx from
the artifact's folder; here the session gets both files from memory, so an s3:// artifact needs
no local copy.

Exported with torch's TorchScript exporter (opset 17, a dynamic batch axis) in PRESERVE mode,
which keeps BatchNormalization nodes named by the state_dict, so every parameter maps onto a
safetensors tensor; ONNX Runtime fuses them into the convolutions itself.
"""

from __future__ import annotations

import io
import json
import struct
import warnings

import numpy as np
import torch
from torch import nn

ONNX_FILE = "model.onnx"
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"
_FP16_SUFFIX = "::float16"
_SAFETENSORS_DTYPES = {"F32": 1, "F16": 10}  # -> onnx TensorProto data types (FLOAT, FLOAT16)


def safetensors_layout(data: bytes) -> dict[str, tuple[str, int, int]]:
    """name -> (dtype, absolute offset, length) of each tensor in a safetensors file's bytes."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    return {name: (entry["dtype"], base + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def export_onnx(model: nn.Module, weights_file: str, weights: bytes, input_size: int, in_channels: int) -> bytes:
    """The graph of `model` (float32, eval, CPU; its parameters equal to what `weights` holds),
    with every parameter found in the safetensors `weights` made external data in `weights_file`."""
    import onnx
    from onnx import TensorProto, helper

    buffer = io.BytesIO()
    example = torch.zeros(1, in_channels, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing and its deprecation
        torch.onnx.export(model.eval(), example, buffer, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    graph_model = onnx.load_from_string(buffer.getvalue())
    layout = safetensors_layout(weights)
    casts = []
    for tensor in graph_model.graph.initializer:
        if tensor.name not in layout:
            continue  # a constant of the exporter's own: it stays in the graph
        dtype, offset, length = layout[tensor.name]
        if dtype not in _SAFETENSORS_DTYPES:
            continue
        name = tensor.name
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_type = _SAFETENSORS_DTYPES[dtype]
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", weights_file), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        if dtype == "F16":
            tensor.name = name + _FP16_SUFFIX
            casts.append(helper.make_node("Cast", [tensor.name], [name], to=TensorProto.FLOAT, name=f"cast:{name}"))
    nodes = casts + list(graph_model.graph.node)
    del graph_model.graph.node[:]
    graph_model.graph.node.extend(nodes)
    graph_model.producer_name = "brainseg-ray"
    return graph_model.SerializeToString()


def onnxruntime_or_reason():
    """(the onnxruntime module, None), or (None, why it cannot be used here)."""
    try:
        import onnxruntime
    except Exception as exc:  # ImportError, or a shared library that does not load on this machine
        return None, f"onnxruntime does not load here ({type(exc).__name__}: {exc})"
    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        return None, "onnxruntime has no CPUExecutionProvider here"
    return onnxruntime, None


def onnx_session(graph: bytes, weights_file: str, weights: bytes, threads: int, spin: bool = True):
    """An ONNX Runtime CPU session of `graph`, its external data `weights` given from memory.
    `threads`: intra-op threads (the CPUs this process was given); one inter-op thread, since a
    U-Net is a chain. `spin=False` lets idle threads sleep (a Serve replica between requests)."""
    onnxruntime, reason = onnxruntime_or_reason()
    if onnxruntime is None:
        raise RuntimeError(reason)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings name graph internals, not user mistakes
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    buffer = np.frombuffer(weights, dtype=np.uint8)
    options.add_external_initializers_from_files_in_memory([weights_file], [buffer], [len(weights)])
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    session._brainseg_weights = buffer  # ORT reads from this buffer: keep it alive with the session
    return session
