"""Graph cleanup with onnx-graphsurgeon: fold constants, drop dead nodes, sort, and pin the graph
I/O to the contract (names, dtypes and the symbolic dims ``batch`` / ``candidates``)."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from astro_trt.contract import GraphIO
from astro_trt.errors import ExportError
from astro_trt.lazy import lazy_import
from astro_trt.precision import dtype

ort = lazy_import("onnxruntime")


def clean(model: onnx.ModelProto) -> onnx.ModelProto:
    # graphsurgeon round-trips local functions lossily (a Constant's value_float comes back as a
    # double), so the functions stay out of its hands and are put back unchanged.
    functions = list(model.functions)
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.functions[:]
    _quiet_onnxruntime()
    graph = gs.import_onnx(bare)
    graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.functions.extend(functions)
    return out


def _quiet_onnxruntime() -> None:
    """Constant folding runs subgraphs in ONNX Runtime, whose optimizer warns about every Unsqueeze
    it cannot fold; those warnings say nothing about the exported graph, so errors only."""
    try:
        ort.set_default_logger_severity(3)
    except ImportError:  # graphsurgeon then folds without it
        return


def pin_io(model: onnx.ModelProto, io: GraphIO) -> None:
    """Set every graph input/output type and shape from the contract (dims by name when dynamic)."""
    by_name = {t.name: t for t in io.inputs + io.outputs}
    actual = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    expected = io.input_names + io.output_names
    if actual != expected:
        raise ExportError(f"{io.name}: traced I/O {actual} does not match the contract {expected}; the model's "
                          "entry point and astro_trt.contract.graph_io disagree, fix one of them")
    for value in list(model.graph.input) + list(model.graph.output):
        spec = by_name[value.name]
        elem = dtype(spec.dtype).onnx_type()
        value.CopyFrom(helper.make_tensor_value_info(spec.name, elem, list(spec.shape)))
