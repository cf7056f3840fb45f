"""What the exporter can honour, checked before any file is written.

The limits come from the runtimes the graphs are for, not from ONNX itself:
- TensorRT indexes one tensor with 32-bit integers (at most 2**31 - 1 elements), and the attention
  bodies materialize, per user and block, the time-bucket comparison [S, S, NT - 1] and the scores
  [H, S, S] with S = L + 1 in the full model; one user (batch 1, one candidate) must fit, or no
  optimization profile can be built at all;
- item ids are Gather indices, which TensorRT holds in int32.
"""

from __future__ import annotations

from collections.abc import Sequence

from astro_trt import contract
from astro_trt.config import ASTROConfig
from astro_trt.errors import ExportError
from astro_trt.precision import REGISTRY

MAX_TENSOR_ELEMENTS = 2**31 - 1


def largest_attention_tensor(cfg: ASTROConfig) -> int:
    """Elements of the largest per-user intermediate of the attention bodies (full model, B = M = 1)."""
    seq = cfg.max_len + 1
    return cfg.num_blocks * seq * seq * max(cfg.num_heads, cfg.num_time_buckets - 1)


def check_export_request(cfg: ASTROConfig, precision: str, attention: str, graphs: Sequence[str]) -> None:
    """Raise ExportError naming the first limit or option the request breaks."""
    if precision not in REGISTRY:
        raise ExportError(f"unknown precision '{precision}'; choose one of {list(REGISTRY)}")
    if attention not in contract.EXPORT_LOWERINGS:
        raise ExportError(f"unknown attention lowering '{attention}'; choose one of {list(contract.EXPORT_LOWERINGS)}")
    unknown = [g for g in graphs if g not in contract.GRAPHS]
    if unknown or not graphs:
        raise ExportError(f"unknown graphs {unknown or '(none given)'}; choose from {list(contract.GRAPHS)}")
    volume = largest_attention_tensor(cfg)
    if volume > MAX_TENSOR_ELEMENTS:
        raise ExportError(
            f"config '{cfg.name}': max_len={cfg.max_len} is too long to export: one user's attention needs a "
            f"tensor of {volume:,} elements (blocks x (L+1)^2 x max(heads, time buckets - 1)), beyond the "
            f"TensorRT limit of {MAX_TENSOR_ELEMENTS:,} (2^31 - 1); reduce max_len, num_blocks or num_time_buckets"
        )
    if cfg.num_items + 1 > MAX_TENSOR_ELEMENTS:
        raise ExportError(
            f"config '{cfg.name}': num_items={cfg.num_items:,} exceeds the int32 index limit of TensorRT's "
            f"Gather ({MAX_TENSOR_ELEMENTS - 1:,} items); re-index items into a smaller vocabulary"
        )
