"""What the bundle loader checks of an ONNX file, read from the protobuf wire format without its
weights: graph inputs and outputs, the shape of every initializer (Loop bodies included), the
tables the graph input ids index (Gather of an initializer by a graph input), and where tensors
stored outside the file say their bytes are.

``onnx.load(..., load_external_data=False)`` would still parse every initializer's raw bytes
(a 1.5 GB table for a large vocabulary, per graph); walking the wire format skips them in O(1)
(a length-delimited field is jumped over), so the check costs what the graph structure costs.
Only the fields read here are decoded (onnx.proto field numbers below); anything malformed is a
ValueError the loader turns into one line naming the file.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

# onnx.proto field numbers of what is read.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE = 1, 5, 11, 12, 15
_NODE_INPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 4, 5
_ATTR_NAME, _ATTR_I, _ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 1, 3, 5, 6, 10, 11
_ATTR_SPARSE, _ATTR_SPARSES = 22, 23
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXTERNAL = 1, 8, 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNCTION_NODE = 7
_VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_TYPE_ELEM = 1, 2, 1, 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# onnx.proto TensorProto.DataType numbers by name (precision.py names each dtype's ONNX type), so
# that the served models, which never import onnx, can check a graph's I/O types too.
ELEM_TYPES = {"FLOAT": 1, "UINT8": 2, "INT8": 3, "UINT16": 4, "INT16": 5, "INT32": 6, "INT64": 7, "STRING": 8,
              "BOOL": 9, "FLOAT16": 10, "DOUBLE": 11, "UINT32": 12, "UINT64": 13, "BFLOAT16": 16}
# Graphs nest through Loop/If/Scan bodies; ours nest one deep. A deeper file is not one of ours
# (and would only exhaust the stack).
_MAX_NESTING = 16


@dataclass
class GraphFacts:
    inputs: list[tuple[str, int]] = field(default_factory=list)  # (name, ONNX elem type), initializers excluded
    outputs: list[tuple[str, int]] = field(default_factory=list)
    initializers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every graph's, Loop bodies too
    gathers: list[tuple[tuple[int, ...], str, int]] = field(default_factory=list)  # (table dims, graph input, axis)
    external: list[dict[str, str]] = field(default_factory=list)  # external_data of every tensor stored outside


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value): an int for varints, a (start, end) span for the rest."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise ValueError("a truncated fixed-size field")
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise ValueError("a field longer than what holds it")
            yield number, wire, (pos, pos + size)
            pos += size
        else:
            raise ValueError(f"wire type {wire}, which ONNX does not use")


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _spans(buf: memoryview, span: tuple[int, int], number: int) -> list[tuple[int, int]]:
    return [v for n, w, v in _fields(buf, *span) if n == number and w == _LEN]


class _Walker:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.facts = buf, GraphFacts()

    def tensor(self, span: tuple[int, int]) -> tuple[str, tuple[int, ...]]:
        name, dims, external = "", [], {}
        for number, wire, value in _fields(self.buf, *span):
            if number == _TENSOR_DIMS and wire == _VARINT:
                dims.append(value)
            elif number == _TENSOR_DIMS and wire == _LEN:  # packed
                pos, end = value
                while pos < end:
                    dim, pos = _varint(self.buf, pos, end)
                    dims.append(dim)
            elif number == _TENSOR_NAME and wire == _LEN:
                name = _text(self.buf, value)
            elif number == _TENSOR_EXTERNAL and wire == _LEN:
                entry = {n: _text(self.buf, v) for n, w, v in _fields(self.buf, *value) if w == _LEN}
                external[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
        if external:
            self.facts.external.append(external)
        return name, tuple(dims)

    def sparse(self, span: tuple[int, int]) -> None:
        for part in (_SPARSE_VALUES, _SPARSE_INDICES):
            for s in _spans(self.buf, span, part):
                self.tensor(s)

    def node(self, span: tuple[int, int], depth: int) -> tuple[str, list[str], int]:
        op, inputs, axis = "", [], 0
        for number, wire, value in _fields(self.buf, *span):
            if number == _NODE_INPUT and wire == _LEN:
                inputs.append(_text(self.buf, value))
            elif number == _NODE_OP_TYPE and wire == _LEN:
                op = _text(self.buf, value)
            elif number == _NODE_ATTRIBUTE and wire == _LEN:
                axis = self.attribute(value, depth, axis)
        return op, inputs, axis

    def attribute(self, span: tuple[int, int], depth: int, axis: int) -> int:
        name, i = "", None
        for number, wire, value in _fields(self.buf, *span):
            if number == _ATTR_NAME and wire == _LEN:
                name = _text(self.buf, value)
            elif number == _ATTR_I and wire == _VARINT:
                i = value - (1 << 64) if value >= 1 << 63 else value
            elif number in (_ATTR_T, _ATTR_TENSORS) and wire == _LEN:
                self.tensor(value)
            elif number in (_ATTR_SPARSE, _ATTR_SPARSES) and wire == _LEN:
                self.sparse(value)
            elif number in (_ATTR_G, _ATTR_GRAPHS) and wire == _LEN:
                self.graph(value, depth + 1)
        return i if name == "axis" and i is not None else axis

    def value_info(self, span: tuple[int, int]) -> tuple[str, int]:
        name, elem = "", 0
        for number, wire, value in _fields(self.buf, *span):
            if number == _VALUE_NAME and wire == _LEN:
                name = _text(self.buf, value)
            elif number == _VALUE_TYPE and wire == _LEN:
                for tensor in _spans(self.buf, value, _TYPE_TENSOR):
                    elem = next((v for n, w, v in _fields(self.buf, *tensor)
                                 if n == _TENSOR_TYPE_ELEM and w == _VARINT), 0)
        return name, elem

    def graph(self, span: tuple[int, int], depth: int) -> None:
        if depth > _MAX_NESTING:
            raise ValueError(f"graphs nested more than {_MAX_NESTING} deep")
        top = depth == 0
        initializers: dict[str, tuple[int, ...]] = {}
        inputs, outputs, nodes = [], [], []
        for number, wire, value in _fields(self.buf, *span):
            if wire != _LEN:
                continue
            if number == _GRAPH_INITIALIZER:
                name, dims = self.tensor(value)
                initializers[name] = dims
            elif number == _GRAPH_SPARSE:
                self.sparse(value)
            elif number == _GRAPH_INPUT and top:
                inputs.append(self.value_info(value))
            elif number == _GRAPH_OUTPUT and top:
                outputs.append(self.value_info(value))
            elif number == _GRAPH_NODE:
                nodes.append(self.node(value, depth))
        self.facts.initializers.update(initializers)
        if top:
            self.facts.inputs = [(n, e) for n, e in inputs if n not in initializers]
            self.facts.outputs = outputs
            names = {n for n, _ in self.facts.inputs}
            self.facts.gathers = [(initializers[i[0]], i[1], axis) for op, i, axis in nodes
                                  if op == "Gather" and len(i) == 2 and i[0] in initializers and i[1] in names]


def read_graph_facts(path: str | Path) -> GraphFacts:
    """The facts of the ONNX model at ``path``; ValueError when it is not one."""
    # Non-blocking, judged by fstat of what was opened: a FIFO or a device in its place is refused
    # without waiting on it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ValueError("an empty file") from None
    finally:
        os.close(fd)
    with mapped:
        buf = memoryview(mapped)
        try:
            walker = _Walker(buf)
            graphs = []
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number == _MODEL_GRAPH and wire == _LEN:
                    graphs.append(value)
                elif number == _MODEL_FUNCTIONS and wire == _LEN:
                    for node in _spans(buf, value, _FUNCTION_NODE):
                        walker.node(node, 1)
            if len(graphs) != 1:
                raise ValueError("no graph" if not graphs else "more than one graph")
            walker.graph(graphs[0], 0)
            if not walker.facts.inputs or not walker.facts.outputs:
                raise ValueError("a graph without inputs or outputs")
            return walker.facts
        finally:
            buf.release()


__all__ = ["ELEM_TYPES", "GraphFacts", "read_graph_facts"]
