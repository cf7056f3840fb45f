"""What each attention plugin accepts, as plain Python: TensorRT-free, so it is testable anywhere.

The plugin classes (plugin.py) delegate their build-time answers here: which input is which,
which data types each may take, the output's shape and type.
"""

from __future__ import annotations

from dataclasses import dataclass

from astro_trt.errors import BackendError
from astro_trt.plugins import operators
from astro_trt.precision import float_dtypes

# Data types by TensorRT's enum member names, so this module never imports TensorRT.
ACTIVATION_TYPES = tuple(d.trt for d in float_dtypes())
INDEX_TYPES = ("INT32", "INT64")


@dataclass(frozen=True)
class OperatorSpec:
    plugin_name: str
    onnx_op: str
    inputs: tuple[str, ...]
    # q, k, v (and the caches): one activation type, which the output takes too.
    activations: tuple[str, ...]
    # bias tables and inverse temperatures: any float type (the kernel reads them as float32).
    tables: tuple[str, ...]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def index(self, name: str) -> int:
        return self.inputs.index(name)

    def allowed_types(self, position: int, first_input_type: str) -> tuple[str, ...]:
        """Types allowed at ``position`` (inputs, then the output) given the type of input 0 (q)."""
        if position >= self.num_inputs:  # the output
            return (first_input_type,)
        name = self.inputs[position]
        if name == "q":
            return ACTIVATION_TYPES
        if name in self.activations:
            return (first_input_type,)
        if name in self.tables:
            return ACTIVATION_TYPES
        return INDEX_TYPES

    def output_shape(self, input_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The output has q's shape [B, Nb, H, S or M, dh]; -1 marks a dynamic dimension."""
        if len(input_shapes) != self.num_inputs:
            raise BackendError(f"{self.plugin_name} takes {self.num_inputs} inputs {list(self.inputs)}, "
                               f"got {len(input_shapes)}; check the ONNX node's inputs")
        rank = len(input_shapes[0])
        if rank != 5:
            raise BackendError(f"{self.plugin_name}: q must have rank 5 [B, Nb, H, S, dh], got rank {rank}; "
                               "reshape q before the attention node")
        return tuple(input_shapes[0])

    def output_type(self, input_types: list[str]) -> str:
        if input_types[0] not in ACTIVATION_TYPES:
            raise BackendError(f"{self.plugin_name}: q has type {input_types[0]}, expected one of "
                               f"{list(ACTIVATION_TYPES)}; cast the activations")
        return input_types[0]


def _spec(op: operators.Operator) -> OperatorSpec:
    return OperatorSpec(op.plugin, op.onnx_op, op.input_names, activations=op.with_role(operators.ACTIVATION),
                        tables=op.with_role(operators.TABLE))


MSA = _spec(operators.MSA)
CANDIDATE = _spec(operators.CANDIDATE)
SPECS = (MSA, CANDIDATE)
