"""The two attention operators as torch custom ops (``astro::...``) for tracing.

Tracing through a custom op keeps each attention call one opaque node, which the symbolic
functions (exporter/symbolic.py) turn into one ``astro`` ONNX node; the reference is the eager
implementation, so a model using ExportOps computes exactly what the oracle computes.
"""

from __future__ import annotations

import torch

from astro_trt.plugins import operators
from astro_trt.plugins.operators import CANDIDATE, MSA


def _register(op: operators.Operator) -> None:
    """``astro::<op.name>`` with the schema of ``op``'s inputs: the reference eagerly, q's shape
    and dtype when traced with fake tensors."""
    torch.library.define(op.torch_op, op.torch_schema())
    reference = operators.implementation(op, operators.Impl.REFERENCE)
    torch.library.impl(op.torch_op, "CompositeExplicitAutograd", reference)
    torch.library.register_fake(op.torch_op, lambda q, *rest: torch.empty_like(q))


for _op in operators.OPERATORS:
    _register(_op)


class ExportOps:
    """AttentionOps (model/astro.py) that route both operators through the astro custom ops."""

    @staticmethod
    def multi_scale_self_attention(*args: torch.Tensor) -> torch.Tensor:
        return getattr(torch.ops.astro, MSA.name)(*MSA.bind(args).values())

    @staticmethod
    def candidate_attention(*args: torch.Tensor) -> torch.Tensor:
        return getattr(torch.ops.astro, CANDIDATE.name)(*CANDIDATE.bind(args).values())
