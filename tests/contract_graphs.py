"""Small ONNX graphs with exactly a contract GraphIO's inputs and outputs (names, dtypes, dynamic
axes), for testing the engine builder and the bundle without the exporter. Each output is the
per-row sum of all inputs broadcast to the output's shape, so every input is live in the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from astro_trt.config import ASTROConfig
from astro_trt.contract import BATCH, CANDIDATES, GraphIO
from astro_trt.precision import dtype

TINY = ASTROConfig(
    name="tiny", num_items=20, num_behaviors=3, num_scenarios=2, d_model=8, num_heads=2, num_layers=1,
    num_blocks=2, max_len=4, num_tasks=2, ffn_dim=8,
)


def contract_graph(io: GraphIO) -> onnx.ModelProto:
    nodes, inits = [], []

    def const(name: str, values: list[int]) -> str:
        inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    row_sums = []
    for t in io.inputs:
        nodes.append(helper.make_node("Cast", [t.name], [f"{t.name}_f"], to=TensorProto.FLOAT))
        if len(t.shape) > 1:
            axes = const(f"{t.name}_axes", list(range(1, len(t.shape))))
            nodes.append(helper.make_node("ReduceSum", [f"{t.name}_f", axes], [f"{t.name}_s"], keepdims=0))
            row_sums.append(f"{t.name}_s")
        else:
            row_sums.append(f"{t.name}_f")
    nodes.append(helper.make_node("Sum", row_sums, ["row"]))
    batch_src = io.inputs[-1].name
    cand_src = next((t.name for t in io.inputs if CANDIDATES in t.shape), None)
    for out in io.outputs:
        dims = []
        for i, d in enumerate(out.shape):
            name = f"{out.name}_d{i}"
            if d == BATCH:
                nodes.append(helper.make_node("Shape", [batch_src], [name], start=0, end=1))
            elif d == CANDIDATES:
                nodes.append(helper.make_node("Shape", [cand_src], [name], start=1, end=2))
            else:
                const(name, [int(d)])
            dims.append(name)
        nodes.append(helper.make_node("Concat", dims, [f"{out.name}_shape"], axis=0))
        ones = const(f"{out.name}_rs", [-1] + [1] * (len(out.shape) - 1))
        nodes.append(helper.make_node("Reshape", ["row", ones], [f"{out.name}_r"]))
        nodes.append(helper.make_node("Expand", [f"{out.name}_r", f"{out.name}_shape"], [f"{out.name}_e"]))
        nodes.append(helper.make_node("Cast", [f"{out.name}_e"], [out.name], to=dtype(out.dtype).onnx_type()))

    def value_info(t):  # noqa: ANN001, ANN202
        return helper.make_tensor_value_info(t.name, dtype(t.dtype).onnx_type(), list(t.shape))

    graph = helper.make_graph(nodes, io.name, [value_info(t) for t in io.inputs],
                              [value_info(t) for t in io.outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def write_contract_graph(io: GraphIO, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(contract_graph(io), path)
    return path


def run_contract_graph(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
