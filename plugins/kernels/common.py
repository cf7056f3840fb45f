"""Helpers shared by both attention kernels: the exact time bucket, in Triton.

The bucket of a time difference is "how many thresholds it has reached" (plugins/buckets.py), an
integer comparison that every runtime evaluates identically. A float log would disagree with the
reference at bucket edges and move a score by a whole table entry, so the kernels count too.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def time_bucket(dt, thr_ptr, NUM_THR: tl.constexpr):
    """dt: int64 tensor of |t_i - t_j| (any shape) -> int32 bucket = #{thresholds <= dt}.

    NUM_THR (= NT - 1, 31 for the presets) is a compile-time constant so the loop unrolls into
    compares against uniform scalar loads the compiler hoists out of the key loop.
    """
    bucket = tl.zeros(dt.shape, dtype=tl.int32)
    for t in tl.static_range(NUM_THR):
        threshold = tl.load(thr_ptr + t).to(tl.int64)
        bucket += (dt >= threshold).to(tl.int32)
    return bucket


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation.

    UPCAST (float32 inputs; bfloat16 under TRITON_INTERPRET, whose bf16 tl.dot returns garbage in
    Triton 3.9) multiplies in exact IEEE float32. Products of two fp16/bf16 numbers are exact in
    float32, so the upcast path computes what a tensor-core dot with fp32 accumulation computes.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)
