"""What each attention plugin accepts, as plain Python: TensorRT-free, so it is testable anywhere.

The plugin classes (plugin.py) delegate their build-time answers here: which input is which,
which data types each may take, the output's shape and type.
"""

from __future__ import annotations

from dataclasses import dataclass

from astro_trt.errors import BackendError
from astro_trt.plugins import operators
from astro_trt.precision import float_dtypes, index_dtypes

# Data types by TensorRT's enum member names, so this module never imports TensorRT.
ACTIVATION_TYPES = tuple(d.trt for d in float_dtypes())
INDEX_TYPES = tuple(d.trt for d in index_dtypes())


@dataclass(frozen=True)
class OperatorSpec:
    """The plugin's build-time view of one operator record of plugins/operators.py, which owns the
    names, the inputs and their roles."""

    op: operators.Operator

    @property
    def plugin_name(self) -> str:
        return self.op.plugin

    @property
    def onnx_op(self) -> str:
        return self.op.onnx_op

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.op.input_names

    @property
    def activations(self) -> tuple[str, ...]:
        """q, k, v (and the caches): one activation type, which the output takes too."""
        return self.op.with_role(operators.ACTIVATION)

    @property
    def tables(self) -> tuple[str, ...]:
        """Bias tables and inverse temperatures: any float type (the kernel reads them as float32)."""
        return self.op.with_role(operators.TABLE)

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


MSA = OperatorSpec(operators.MSA)
CANDIDATE = OperatorSpec(operators.CANDIDATE)
SPECS = tuple(OperatorSpec(op) for op in operators.OPERATORS)  # one plugin per operator record
