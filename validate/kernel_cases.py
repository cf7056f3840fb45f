"""One kernel-benchmark shape, on its own so that the accounting (kernel_bench, plain Python) and the
implementations (kernel_impls, torch on a GPU) share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

# The implementations run_benchmark can time (kernel_impls.implementations), in table order.
IMPLS = ("triton", "reference", "sdpa-dense-mask", "flex")


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``op`` is 'msa' (history self-attention) or 'candidate'."""

    config: str
    op: str
    batch: int
    blocks: int
    heads: int
    hist: int
    head_dim: int
    cands: int = 0
