"""Deployable export of compressed models (ONNX with physical int4/int8 kernels)."""

from slimformer.export.onnx_export import (
    DEFAULT_OPSET,
    ExportInfo,
    export_fp32,
    export_onnx,
    graph_overhead_bytes,
    measured_session_bytes,
    onnx_outputs,
    resident_weight_bytes,
    session,
)

__all__ = ["DEFAULT_OPSET", "ExportInfo", "export_fp32", "export_onnx", "graph_overhead_bytes",
           "measured_session_bytes",
           "onnx_outputs", "resident_weight_bytes", "session"]
