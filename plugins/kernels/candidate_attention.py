"""Triton forward kernel of CandidateAttention (semantics: plugins/reference.py).

One program owns BLOCK_M candidates of one (user, block, head) and streams that user's cached
history K/V in BLOCK_N tiles: every K/V tile is loaded once per tile of candidates, so the
history's cost is shared by all candidates of the user. Both biases of a history key depend only
on the key (distance L - j to the candidate at position L, |request_time - t_j|), so they are a
[BLOCK_N] vector per tile. The candidate's own key (always visible, distance 0, dt 0) seeds the
online softmax, which is why no row is ever empty. Only valid history slots [L - length, L) are
read. No [M, L] score tensor reaches global memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from astro_trt.plugins.kernels.common import mma, program_coords, softmax_step, time_bucket

# A constexpr: a compiled (not interpreted) kernel may only read constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def candidate_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr,
    len_ptr, times_ptr, rt_ptr, pos_ptr, tbias_ptr, thr_ptr, itau_ptr,
    stride_qb, stride_qn, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vm, stride_vd,
    stride_cb, stride_cn, stride_ch, stride_cl, stride_cd,
    stride_wb, stride_wn, stride_wh, stride_wl, stride_wd,
    stride_ob, stride_on, stride_oh, stride_om, stride_od,
    stride_lb, stride_ln,
    stride_tb, stride_tn, stride_tl,
    stride_rb,
    stride_pn, stride_ph, stride_pp,
    stride_bn, stride_bh, stride_bt,
    stride_ib, stride_in, stride_ih,
    NB, H, M, L, DH,
    NUM_THR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m, b, n, h, offs_m, offs_d, row_ok, d_ok = program_coords(NB, H, M, DH, BLOCK_M, BLOCK_D)
    tile_ok = row_ok[:, None] & d_ok[None, :]

    length = tl.load(len_ptr + b * stride_lb + n * stride_ln).to(tl.int32)
    first_valid = L - length
    itau = tl.load(itau_ptr + b * stride_ib + n * stride_in + h * stride_ih).to(tl.float32)
    scale = itau * LOG2E
    request_time = tl.load(rt_ptr + b * stride_rb).to(tl.int64)
    pos_base = pos_ptr + n * stride_pn + h * stride_ph
    tb_base = tbias_ptr + n * stride_bn + h * stride_bh

    q = tl.load(q_ptr + b * stride_qb + n * stride_qn + h * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
    k_self = tl.load(k_ptr + b * stride_kb + n * stride_kn + h * stride_kh
                     + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd, mask=tile_ok, other=0.0)
    v_self = tl.load(v_ptr + b * stride_vb + n * stride_vn + h * stride_vh
                     + offs_m[:, None] * stride_vm + offs_d[None, :] * stride_vd, mask=tile_ok, other=0.0)

    # The candidate's own key: distance 0 and time difference 0 are bucket 0 of both tables.
    self_bias = tl.load(pos_base).to(tl.float32) + tl.load(tb_base).to(tl.float32)
    s_self = (tl.sum(q.to(tl.float32) * k_self.to(tl.float32), 1) + self_bias) * scale
    m_i = s_self
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = v_self.to(tl.float32)

    kc_base = kc_ptr + b * stride_cb + n * stride_cn + h * stride_ch
    vc_base = vc_ptr + b * stride_wb + n * stride_wn + h * stride_wh
    t_base = times_ptr + b * stride_tb + n * stride_tn
    lo = (first_valid // BLOCK_N) * BLOCK_N
    for start_n in range(lo, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = (offs_n < L) & (offs_n >= first_valid)
        k = tl.load(kc_base + offs_n[:, None] * stride_cl + offs_d[None, :] * stride_cd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        qk = mma(q, tl.trans(k), UPCAST)

        pos_b = tl.load(pos_base + (L - offs_n) * stride_pp, mask=col_ok, other=0.0).to(tl.float32)
        t_k = tl.load(t_base + offs_n * stride_tl, mask=col_ok, other=0).to(tl.int64)
        bucket = time_bucket(tl.abs(request_time - t_k), thr_ptr, NUM_THR)
        time_b = tl.load(tb_base + bucket * stride_bt, mask=col_ok, other=0.0).to(tl.float32)

        s = (qk + (pos_b + time_b)[None, :]) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # m_i is finite from the start (the self key), so no -inf guard is needed here.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        v = tl.load(vc_base + offs_n[:, None] * stride_wl + offs_d[None, :] * stride_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc, l_i = softmax_step(acc, m_i, l_i, s, v, m_new, UPCAST)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + n * stride_on + h * stride_oh
             + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=tile_ok)
