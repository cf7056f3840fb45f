"""Triton forward kernel of MultiScaleSelfAttention (semantics: plugins/reference.py).

Flash-style: one program owns BLOCK_M queries of one (user, block, head) and streams the keys
in BLOCK_N tiles with an online softmax, so no [S, S] score tensor ever reaches global memory.
The relative bias is computed in the kernel: the position bias is gathered from the [Nb, H, P]
distance table by |i - j|, the time bias from the [Nb, H, NT] table by the exact bucket of
|t_i - t_j|. Causality and right-aligned padding bound the key loop: the program reads only keys
in [S - length, last query of the tile], so padded and future tiles cost nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from astro_trt.plugins.kernels.common import mma, program_coords, softmax_step, time_bucket

# A constexpr: a compiled (not interpreted) kernel may only read constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def msa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    len_ptr, times_ptr, pos_ptr, tbias_ptr, thr_ptr, itau_ptr,
    stride_qb, stride_qn, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_on, stride_oh, stride_os, stride_od,
    stride_lb, stride_ln,
    stride_tb, stride_tn, stride_ts,
    stride_pn, stride_ph, stride_pp,
    stride_bn, stride_bh, stride_bt,
    stride_ib, stride_in, stride_ih,
    NB, H, S, DH,
    NUM_THR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m, b, n, h, offs_m, offs_d, row_ok, d_ok = program_coords(NB, H, S, DH, BLOCK_M, BLOCK_D)

    length = tl.load(len_ptr + b * stride_lb + n * stride_ln).to(tl.int32)
    first_valid = S - length
    itau = tl.load(itau_ptr + b * stride_ib + n * stride_in + h * stride_ih).to(tl.float32)
    # Scores are used as exp2(s * log2 e): fold log2 e into the temperature once.
    scale = itau * LOG2E

    q_base = q_ptr + b * stride_qb + n * stride_qn + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    t_base = times_ptr + b * stride_tb + n * stride_tn
    t_q = tl.load(t_base + offs_m * stride_ts, mask=row_ok, other=0).to(tl.int64)
    pos_base = pos_ptr + n * stride_pn + h * stride_ph
    tb_base = tbias_ptr + n * stride_bn + h * stride_bh
    k_base = k_ptr + b * stride_kb + n * stride_kn + h * stride_kh
    v_base = v_ptr + b * stride_vb + n * stride_vn + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys before first_valid are padding, keys after the tile's last query are in its future.
    lo = (first_valid // BLOCK_N) * BLOCK_N
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = (offs_n < S) & (offs_n >= first_valid)
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        qk = mma(q, tl.trans(k), UPCAST)

        dist = tl.abs(offs_m[:, None] - offs_n[None, :])
        visible = col_ok[None, :] & row_ok[:, None] & (offs_n[None, :] <= offs_m[:, None])
        pos_b = tl.load(pos_base + dist * stride_pp, mask=visible, other=0.0).to(tl.float32)
        t_k = tl.load(t_base + offs_n * stride_ts, mask=col_ok, other=0).to(tl.int64)
        bucket = time_bucket(tl.abs(t_q[:, None] - t_k[None, :]), thr_ptr, NUM_THR)
        time_b = tl.load(tb_base + bucket * stride_bt, mask=visible, other=0.0).to(tl.float32)

        s = (qk + pos_b + time_b) * scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc, l_i = softmax_step(acc, m_i, l_i, s, v, m_safe, UPCAST)
        m_i = m_new

    # Queries that saw no key (padding slots) output zeros, as the reference does.
    denom = tl.where(l_i > 0, l_i, 1.0)
    out = acc / denom[:, None]
    o_base = out_ptr + b * stride_ob + n * stride_on + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
