"""Helpers shared by both attention kernels: program coordinates, the exact time bucket, the
online-softmax step, in Triton.

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


@triton.jit
def program_coords(NB, H, ROWS, DH, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (user b, block n, head h), its query rows and head lanes with their masks:
    the grid is (row tiles, B * Nb * H), as plugins/kernels/ops.py launches it."""
    pid_m = tl.program_id(0)
    pid_bnh = tl.program_id(1)
    h = pid_bnh % H
    n = (pid_bnh // H) % NB
    b = pid_bnh // (H * NB)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_m, b, n, h, offs_m, offs_d, offs_m < ROWS, offs_d < DH


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, m_safe, UPCAST: tl.constexpr):
    """One key tile of the online softmax: scores ``s`` (log2 units) rescaled from the previous
    max ``m_i`` to ``m_safe``, the new max (0 where a row has seen no key yet) -> (acc, l_i)."""
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # Probabilities enter the second product in the input dtype, as in FlashAttention.
    acc += mma(p.to(v.dtype), v, UPCAST)
    return acc, l_i
