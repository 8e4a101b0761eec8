"""Chunkwise gated linear attention in Triton (backend triton, plan chunk): the contract of
rcc.runtime.chunk.chunk_linear_attention, S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t,
per-key (GLA) or scalar (RetNet, Mamba-2) log-decays g.

The work is split as in the fastest chunked kernels, so that every product is a tl.dot on blocks of
at most 64 and only one kernel walks the chunks in order:
- b, the log-decays summed from each chunk's start (torch: a cumsum per chunk of C steps);
- `_chunk_states`, the only sequential part: one program per (key block, value block, row) keeps
  its slice of the state on chip and stores the state entering every chunk,
      S' = e^{b_C} S + (k e^{b_C - b})^T v;
- `_chunk_scores`, one program per (sub-chunk of 16 rows, chunk, row): the causal scores
  A_ij = sum_k q_ik k_jk e^{b_ik - b_jk}. Between sub-chunks each factor is measured from a
  reference row r (the first of i's sub-chunk): (q_i e^{b_i - b_r}) . (k_j e^{b_r - b_j}), both
  exponents <= 0 when the log-decays are; inside a sub-chunk, one column at a time with the
  exponent taken whole. No [C, C, K] tile exists. A scalar decay needs no reference: one
  [16, C] product times e^{b_i - b_j};
- `_chunk_output`, one program per (value block, chunk, row): o = (q e^b) S + A v.
Backward: the states again (recomputed, not stored), their gradients by the same sequential
kernel run in reverse (dS = e^{b_C} dS' + (q e^b)^T do), `_chunk_dv` (dv = A^T do + (k e^{b_C - b})
dS', and dA = do v^T), `_chunk_dqk` (dq, dk: the same reference-row split, plus the state terms).
The log-decays' gradient needs no kernel: with B the global prefix sum, dL/dB_t = q_t dq_t -
k_t dk_t (+ S_T dS_T summed over values at the last step), and dg is its sum from t on.

Exponents are differences of chunk-local sums, so a log-decay of -60 per step costs the products
far from the diagonal only digits of numbers that are ~e^{-60} anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import accumulator, check, dot_type

SUB_ROWS = 16  # rows of a sub-chunk (the smallest tl.dot)
SUB = tl.constexpr(SUB_ROWS)


@triton.jit
def _dot(a, b, ACC: tl.constexpr, DOT: tl.constexpr):
    return tl.dot(a.to(DOT), b.to(DOT), input_precision="ieee", out_dtype=ACC)


@triton.jit
def _tile(ptr, rows, cols, rmask, cmask, width, ACC: tl.constexpr):
    # ptr[rows, cols] of a row-major array with `width` columns, masked to 0
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                   other=0.0).to(ACC)


@triton.jit
def _vector(ptr, row, cols, cmask, row_ok, width, ACC: tl.constexpr):
    # ptr[row, cols] of a row-major array, masked to 0 (row_ok: a scalar condition on the row)
    return tl.load(ptr + row * width + cols, mask=cmask & ((cols * 0 + row_ok) != 0), other=0.0).to(ACC)


@triton.jit
def _decays(b_ptr, rows, kk, kmask, G, g_sk, ACC: tl.constexpr):
    # the chunk-local log-decay sums of `rows` (rows of the padded [N * Tp] array) on keys kk: a
    # scalar decay (G = 1) is read with key stride 0
    return tl.load(b_ptr + rows[:, None] * G + kk[None, :] * g_sk, mask=kmask[None, :], other=0.0).to(ACC)


@triton.jit
def _state_slice(s_in_ptr, n, kk, vv, K, V, ACC: tl.constexpr):
    # a sequential kernel's slice of row n's [K, V] state: offsets, mask, its initial value
    s_off = kk[:, None] * V + vv[None, :]
    s_mask = (kk < K)[:, None] & (vv < V)[None, :]
    return s_off, s_mask, tl.load(s_in_ptr + n * K * V + s_off, mask=s_mask, other=0.0).to(ACC)


@triton.jit
def _nth_chunk(i, NC, REVERSE: tl.constexpr):
    # the chunk a sequential kernel visits i-th: in order, or REVERSE from the last
    if REVERSE:
        return NC - 1 - i
    else:
        return i


@triton.jit(do_not_specialize=["T", "NC"])  # a new length or batch never recompiles
def _chunk_states(x_ptr, y_ptr, b_ptr, bq_ptr, s_in_ptr, states_ptr, s_out_ptr, T, NC, K, V, G, g_sk,
                  REVERSE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr):
    """Forward (x = k, y = v): h[c] = the state entering chunk c, s_out = the last state.
    REVERSE (x = q, its decays bq, y = do, s_in = dS_T): h[c] = the gradient of the state leaving chunk c,
    s_out = dS_0."""
    ik, iv, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kk, vv, cc = ik * BK + tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, C)
    kmask, vmask = kk < K, vv < V
    s_off, s_mask, S = _state_slice(s_in_ptr, n, kk, vv, K, V, ACC)
    for i in range(0, NC):
        c = _nth_chunk(i, NC, REVERSE)
        tl.store(states_ptr + (n * NC + c) * K * V + s_off, S, mask=s_mask)
        t = c * C + cc
        x = _tile(x_ptr, n * T + t, kk, t < T, kmask, K, ACC)
        y = _tile(y_ptr, n * T + t, vv, t < T, vmask, V, ACC)
        b = _decays(b_ptr, n * NC * C + t, kk, kmask, G, g_sk, ACC)
        b_end = tl.load(b_ptr + (n * NC * C + c * C + C - 1) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
        if REVERSE:
            x = x * tl.exp(_decays(bq_ptr, n * NC * C + t, kk, kmask, G, g_sk, ACC))
        else:
            x = x * tl.exp(b_end[None, :] - b)
        S = tl.exp(b_end)[:, None] * S + _dot(tl.trans(x), y, ACC, DOT)
    tl.store(s_out_ptr + n * K * V + s_off, S, mask=s_mask)


@triton.jit(do_not_specialize=["T"])
def _chunk_scores(q_ptr, k_ptr, b_ptr, bq_ptr, a_ptr, T, K, G, g_sk, SCALAR: tl.constexpr,
                  STRICT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr):
    """A[t, j] (t's chunk's column j): the causal scores of sub-chunk program_id(0)'s rows, the
    queries' decays bq (b, or STRICT, b of the step before: j < t)."""
    i_s, c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = n * tl.num_programs(1) * C  # the row's first step in the padded arrays
    rr = tl.arange(0, SUB)
    r0 = c * C + i_s * SUB
    t_i = r0 + rr
    if SCALAR:  # one [SUB, C] product times the pairwise decays
        cc = tl.arange(0, C)
        t_j = c * C + cc
        acc = tl.zeros((SUB, C), ACC)
        for kb in range(0, tl.cdiv(K, BK)):
            kk = kb * BK + tl.arange(0, BK)
            qi = _tile(q_ptr, n * T + t_i, kk, t_i < T, kk < K, K, ACC)
            kj = _tile(k_ptr, n * T + t_j, kk, t_j < T, kk < K, K, ACC)
            acc += _dot(qi, tl.trans(kj), ACC, DOT)
        bi = tl.load(bq_ptr + (base + t_i) * G).to(ACC)
        bj = tl.load(b_ptr + (base + t_j) * G).to(ACC)
        causal = cc[None, :] + STRICT <= (i_s * SUB + rr)[:, None]
        A = tl.where(causal, acc * tl.exp(tl.where(causal, bi[:, None] - bj[None, :], 0.0)), 0.0)
        tl.store(a_ptr + (base + t_i)[:, None] * C + cc[None, :], A)
    else:
        for j in range(0, i_s):  # the blocks left of the diagonal, through the reference row r0
            t_j = rr + j * SUB + c * C
            acc = tl.zeros((SUB, SUB), ACC)
            for kb in range(0, tl.cdiv(K, BK)):
                kk = kb * BK + tl.arange(0, BK)
                kmask = kk < K
                b_ref = tl.load(bq_ptr + (base + r0) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
                qi = _tile(q_ptr, n * T + t_i, kk, t_i < T, kmask, K, ACC)
                qi *= tl.exp(_decays(bq_ptr, base + t_i, kk, kmask, G, g_sk, ACC) - b_ref[None, :])
                kj = _tile(k_ptr, n * T + t_j, kk, t_j < T, kmask, K, ACC)
                kj *= tl.exp(b_ref[None, :] - _decays(b_ptr, base + t_j, kk, kmask, G, g_sk, ACC))
                acc += _dot(qi, tl.trans(kj), ACC, DOT)
            tl.store(a_ptr + (base + t_i)[:, None] * C + (rr + j * SUB)[None, :], acc)
        acc = tl.zeros((SUB, SUB), ACC)  # the diagonal block, a column at a time
        for kb in range(0, tl.cdiv(K, BK)):
            kk = kb * BK + tl.arange(0, BK)
            kmask = kk < K
            qi = _tile(q_ptr, n * T + t_i, kk, t_i < T, kmask, K, ACC)
            bi = _decays(bq_ptr, base + t_i, kk, kmask, G, g_sk, ACC)
            for jj in range(0, SUB):
                kj = _vector(k_ptr, n * T + r0 + jj, kk, kmask, r0 + jj < T, K, ACC)
                bj = tl.load(b_ptr + (base + r0 + jj) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
                seen = (rr >= jj + STRICT)[:, None]
                terms = qi * kj[None, :] * tl.exp(tl.where(seen, bi - bj[None, :], 0.0))
                col = tl.sum(tl.where(seen, terms, 0.0), 1)
                acc += tl.where(rr[None, :] == jj, col[:, None], 0.0)
        tl.store(a_ptr + (base + t_i)[:, None] * C + (i_s * SUB + rr)[None, :], acc)


@triton.jit
def _causal_scores(a_ptr, base, c, cc, C: tl.constexpr, STRICT: tl.constexpr, ACC: tl.constexpr):
    # the chunk's [C, C] scores, zero above the diagonal (never written there; STRICT: and on it)
    A = tl.load(a_ptr + (base + c * C + cc)[:, None] * C + cc[None, :]).to(ACC)
    return tl.where(cc[None, :] + STRICT <= cc[:, None], A, 0.0)


@triton.jit(do_not_specialize=["T"])
def _chunk_output(q_ptr, v_ptr, bq_ptr, states_ptr, a_ptr, o_ptr, T, K, V, G, g_sk,
                  STRICT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr):
    """o = (q e^bq) S + A v for one (value block, chunk, row)."""
    iv, c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC = tl.num_programs(1)
    cc, vv = tl.arange(0, C), iv * BV + tl.arange(0, BV)
    t = c * C + cc
    o = tl.zeros((C, BV), ACC)
    for kb in range(0, tl.cdiv(K, BK)):
        kk = kb * BK + tl.arange(0, BK)
        q = _tile(q_ptr, n * T + t, kk, t < T, kk < K, K, ACC)
        q *= tl.exp(_decays(bq_ptr, n * NC * C + t, kk, kk < K, G, g_sk, ACC))
        S = _tile(states_ptr + (n * NC + c) * K * V, kk, vv, kk < K, vv < V, V, ACC)
        o += _dot(q, S, ACC, DOT)
    v = _tile(v_ptr, n * T + t, vv, t < T, vv < V, V, ACC)
    o += _dot(_causal_scores(a_ptr, n * NC * C, c, cc, C, STRICT, ACC), v, ACC, DOT)
    tl.store(o_ptr + (n * T + t)[:, None] * V + vv[None, :], o, mask=(t < T)[:, None] & (vv < V)[None, :])


@triton.jit(do_not_specialize=["T"])
def _chunk_dv(k_ptr, v_ptr, b_ptr, a_ptr, do_ptr, dstates_ptr, dv_ptr, da_ptr, T, K, V, G, g_sk,
              STRICT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr):
    """One (chunk, row): dv = A^T do + (k e^{b_C - b}) dS' over the value blocks, and the scores'
    gradient dA = do v^T (causal)."""
    c, n = tl.program_id(0), tl.program_id(1)
    NC = tl.num_programs(0)
    base = n * NC * C
    cc = tl.arange(0, C)
    t = c * C + cc
    A = _causal_scores(a_ptr, base, c, cc, C, STRICT, ACC)
    dA = tl.zeros((C, C), ACC)
    for vb in range(0, tl.cdiv(V, BV)):
        vv = vb * BV + tl.arange(0, BV)
        do = _tile(do_ptr, n * T + t, vv, t < T, vv < V, V, ACC)
        dA += _dot(do, tl.trans(_tile(v_ptr, n * T + t, vv, t < T, vv < V, V, ACC)), ACC, DOT)
        dv = _dot(tl.trans(A), do, ACC, DOT)
        for kb in range(0, tl.cdiv(K, BK)):
            kk = kb * BK + tl.arange(0, BK)
            kmask = kk < K
            b_end = tl.load(b_ptr + (base + c * C + C - 1) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
            k = _tile(k_ptr, n * T + t, kk, t < T, kmask, K, ACC)
            k *= tl.exp(b_end[None, :] - _decays(b_ptr, base + t, kk, kmask, G, g_sk, ACC))
            dv += _dot(k, _tile(dstates_ptr + (n * NC + c) * K * V, kk, vv, kmask, vv < V, V, ACC), ACC, DOT)
        tl.store(dv_ptr + (n * T + t)[:, None] * V + vv[None, :], dv,
                 mask=(t < T)[:, None] & (vv < V)[None, :])
    dA = tl.where(cc[None, :] + STRICT <= cc[:, None], dA, 0.0)
    tl.store(da_ptr + (base + t)[:, None] * C + cc[None, :], dA)


@triton.jit(do_not_specialize=["T"])
def _chunk_dqk(q_ptr, k_ptr, v_ptr, b_ptr, bq_ptr, states_ptr, dstates_ptr, do_ptr, da_ptr, dq_ptr,
               dk_ptr, T, K, V, G, g_sk, SCALAR: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DIAG: tl.constexpr = 0,
               STATES: tl.constexpr = 1):
    """dq, dk of one (key block x sub-chunk, chunk, row), less each step's own term dA_tt (k_t,
    q_t) (added by the caller: left in, its rounding would not cancel in q dq - k dk, the log-decays'
    gradient, which is ~e^{-60} when the decays are): through the scores (dq_i = sum_{j<i} dA_ij
    k_j e^{b_i - b_j}, dk_j = sum_{i>j} dA_ij q_i e^{b_i - b_j}, split at reference rows as in
    `_chunk_scores`, with the queries' decays bq in place of b_i) and through the states (dq =
    e^bq do S^T, dk = e^{b_C - b} v dS'^T). DIAG: with each step's own term; STATES 0: through the
    scores only (another form's pair of score and key vectors, dplr.py)."""
    NS: tl.constexpr = C // SUB
    i_s, c, n = tl.program_id(0) % NS, tl.program_id(1), tl.program_id(2)
    kk = (tl.program_id(0) // NS) * BK + tl.arange(0, BK)
    kmask = kk < K
    NC = tl.num_programs(1)
    base = n * NC * C
    rr = tl.arange(0, SUB)
    r0 = c * C + i_s * SUB
    t_i = r0 + rr
    i_ok = t_i < T
    bi = _decays(b_ptr, base + t_i, kk, kmask, G, g_sk, ACC)
    bqi = _decays(bq_ptr, base + t_i, kk, kmask, G, g_sk, ACC)
    if SCALAR:
        cc = tl.arange(0, C)
        t_j = c * C + cc
        bj = tl.load(b_ptr + (base + t_j) * G).to(ACC)
        bqj = tl.load(bq_ptr + (base + t_j) * G).to(ACC)
        b_i = tl.load(b_ptr + (base + t_i) * G).to(ACC)
        bq_i = tl.load(bq_ptr + (base + t_i) * G).to(ACC)
        before = cc[None, :] < (i_s * SUB + rr)[:, None] + DIAG  # [i rows, chunk columns]: j < i
        dA = tl.load(da_ptr + (base + t_i)[:, None] * C + cc[None, :]).to(ACC)
        dA = tl.where(before, dA * tl.exp(tl.where(before, bq_i[:, None] - bj[None, :], 0.0)), 0.0)
        dq = _dot(dA, _tile(k_ptr, n * T + t_j, kk, t_j < T, kmask, K, ACC), ACC, DOT)
        after = (i_s * SUB + rr)[None, :] < cc[:, None] + DIAG  # [chunk rows, i columns]: i < row
        dAt = tl.load(da_ptr + (base + t_j)[:, None] * C + (i_s * SUB + rr)[None, :]).to(ACC)
        dAt = tl.where(after, dAt * tl.exp(tl.where(after, bqj[:, None] - b_i[None, :], 0.0)), 0.0)
        dk = _dot(tl.trans(dAt), _tile(q_ptr, n * T + t_j, kk, t_j < T, kmask, K, ACC), ACC, DOT)
    else:
        dq = tl.zeros((SUB, BK), ACC)
        b_ref = tl.load(bq_ptr + (base + r0) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
        for j in range(0, i_s):  # earlier sub-chunks, through this one's first row
            t_j = rr + j * SUB + c * C
            kj = _tile(k_ptr, n * T + t_j, kk, t_j < T, kmask, K, ACC)
            kj *= tl.exp(b_ref[None, :] - _decays(b_ptr, base + t_j, kk, kmask, G, g_sk, ACC))
            dA = tl.load(da_ptr + (base + t_i)[:, None] * C + (rr + j * SUB)[None, :]).to(ACC)
            dq += _dot(dA, kj, ACC, DOT)
        dq *= tl.exp(bqi - b_ref[None, :])
        dk = tl.zeros((SUB, BK), ACC)
        b_ref = tl.load(b_ptr + (base + r0 + SUB - 1) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
        for m in range(i_s + 1, NS):  # later sub-chunks, through this one's last row
            t_m = rr + m * SUB + c * C
            qm = _tile(q_ptr, n * T + t_m, kk, t_m < T, kmask, K, ACC)
            qm *= tl.exp(_decays(bq_ptr, base + t_m, kk, kmask, G, g_sk, ACC) - b_ref[None, :])
            dA = tl.load(da_ptr + (base + t_m)[:, None] * C + (i_s * SUB + rr)[None, :]).to(ACC)
            dk += _dot(tl.trans(dA), qm, ACC, DOT)
        dk *= tl.exp(b_ref[None, :] - bi)
        for jj in range(0, SUB):  # the diagonal block, a step at a time (but each step's own term)
            t = r0 + jj
            bj = tl.load(b_ptr + (base + t) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
            bqj = tl.load(bq_ptr + (base + t) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
            kj = _vector(k_ptr, n * T + t, kk, kmask, t < T, K, ACC)
            qj = _vector(q_ptr, n * T + t, kk, kmask, t < T, K, ACC)
            dA_col = tl.load(da_ptr + (base + t_i) * C + i_s * SUB + jj).to(ACC)  # dA[i, jj]
            dA_row = tl.load(da_ptr + (base + t) * C + i_s * SUB + rr).to(ACC)  # dA[jj, i]
            after = (rr + DIAG > jj)[:, None]
            dq += tl.where(after, dA_col[:, None] * kj[None, :]
                           * tl.exp(tl.where(after, bqi - bj[None, :], 0.0)), 0.0)
            upto = (rr < jj + DIAG)[:, None]
            dk += tl.where(upto, dA_row[:, None] * qj[None, :]
                           * tl.exp(tl.where(upto, bqj[None, :] - bi, 0.0)), 0.0)
    if STATES:
        b_end = tl.load(b_ptr + (base + c * C + C - 1) * G + kk * g_sk, mask=kmask, other=0.0).to(ACC)
        dq_state = tl.zeros((SUB, BK), ACC)
        dk_state = tl.zeros((SUB, BK), ACC)
        for vb in range(0, tl.cdiv(V, BV)):
            vv = vb * BV + tl.arange(0, BV)
            S = _tile(states_ptr + (n * NC + c) * K * V, kk, vv, kmask, vv < V, V, ACC)
            dS = _tile(dstates_ptr + (n * NC + c) * K * V, kk, vv, kmask, vv < V, V, ACC)
            dq_state += _dot(_tile(do_ptr, n * T + t_i, vv, i_ok, vv < V, V, ACC), tl.trans(S), ACC, DOT)
            dk_state += _dot(_tile(v_ptr, n * T + t_i, vv, i_ok, vv < V, V, ACC), tl.trans(dS), ACC, DOT)
        dq += tl.exp(bqi) * dq_state
        dk += tl.exp(b_end[None, :] - bi) * dk_state
    out = (n * T + t_i)[:, None] * K + kk[None, :]
    tl.store(dq_ptr + out, dq, mask=i_ok[:, None] & kmask[None, :])
    tl.store(dk_ptr + out, dk, mask=i_ok[:, None] & kmask[None, :])


def _setup(q, v, g, chunk_size, prev):
    """Sizes, constexprs, the chunk-local log-decay sums b [N, NC * C, G] (accumulator type) and
    the queries' bq: b, or with prev (o_t reads the state before step t) b of the step before (0
    at a chunk's start), an exclusive sum."""
    N, T, K = q.shape
    V, G = v.shape[-1], g.shape[-1]
    C = min(64, max(SUB_ROWS, triton.next_power_of_2(int(chunk_size))))  # not T's: one kernel for every T
    NC = triton.cdiv(T, C)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    b = torch.zeros(N, NC, C, G, dtype=wide, device=q.device)
    b.view(N, NC * C, G)[:, :T] = g
    b, before = decay_sums(b)
    bq = before if prev else b
    meta = dict(ACC=accumulator(q.dtype), DOT=dot_type(q.dtype), C=C, BK=block(K, q.dtype),
                BV=block(V, q.dtype))
    sizes = (N, T, K, V, G, NC)
    return sizes, b.view(N, NC * C, G), bq.reshape(N, NC * C, G), meta, 0 if G == 1 else 1


def decay_sums(g):
    """Log-decays per chunk [N, NC, C, G] -> their sums from the chunk's start through each step,
    and through the step before (0 at the start)."""
    b = g.cumsum(2)
    return b, torch.cat([torch.zeros_like(b[:, :, :1]), b[:, :, :-1]], 2)


def kept(dtype):
    """The type of the chunk states kept between kernels: the inputs' (as the products read
    them), but float32 for float16 (its range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def launch(dtype) -> dict:
    """Warps and pipeline stages of every chunk kernel: 8 warps (at 4 the backward's [C, C] tiles
    spill, sm_90, bfloat16, K = V = 128); float32 and float64 products have no tensor-core path
    and, pipelined over 3 stages, need more shared memory than an H100 has: 1 stage."""
    half = dtype in (torch.bfloat16, torch.float16)
    return dict(num_warps=8, num_stages=3 if half else 1)


def block(size, dtype) -> int:
    """Keys or values per block: 64 on half types, 32 on float32 and float64 (twice the bytes:
    at 64 the backward's [C, C] tiles spill at 8 warps), 16 at least (the smallest tl.dot)."""
    most = 64 if dtype in (torch.bfloat16, torch.float16) else 32
    return max(16, min(most, triton.next_power_of_2(size)))


def _blocks(K, V, meta):
    return triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"])


def _states(x, y, b, bq, s_in, sizes, meta, g_sk, reverse=False):
    """The sequential kernel: (per-chunk states or their gradients [N, NC, K, V], last one)."""
    N, T, K, V, G, NC = sizes
    h = torch.empty(N, NC, K, V, dtype=kept(x.dtype), device=x.device)
    s_out = torch.empty(N, K, V, dtype=b.dtype, device=x.device)
    _chunk_states[_blocks(K, V, meta) + (N,)](x, y, b, bq, s_in, h, s_out, T, NC, K, V, G, g_sk,
                                              REVERSE=reverse, **launch(x.dtype), **meta)
    return h, s_out


def _scores(q, k, b, bq, sizes, meta, g_sk, prev):
    N, T, K, V, G, NC = sizes
    A = torch.empty(N, NC * meta["C"], meta["C"], dtype=b.dtype, device=q.device)
    meta = {k: meta[k] for k in ("ACC", "DOT", "C", "BK")}
    _chunk_scores[(meta["C"] // SUB_ROWS, NC, N)](q, k, b, bq, A, T, K, G, g_sk, SCALAR=G == 1,
                                                  STRICT=int(prev), **launch(q.dtype), **meta)
    return A


class _ChunkGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, S0, chunk_size, prev):
        q, k, v, g, S0 = (x.contiguous() for x in (q, k, v, g, S0))
        sizes, b, bq, meta, g_sk = _setup(q, v, g, chunk_size, prev)
        N, T, K, V, G, NC = sizes
        h, S_T = _states(k, v, b, bq, S0, sizes, meta, g_sk)
        A = _scores(q, k, b, bq, sizes, meta, g_sk, prev)
        o = torch.empty(N, T, V, dtype=q.dtype, device=q.device)
        _chunk_output[(triton.cdiv(V, meta["BV"]), NC, N)](q, v, bq, h, A, o, T, K, V, G, g_sk,
                                                           STRICT=int(prev), **launch(q.dtype), **meta)
        ctx.save_for_backward(q, k, v, g, S0, S_T)
        ctx.chunk_size, ctx.prev = chunk_size, prev
        return o, S_T.to(S0.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, do, dS_T):
        q, k, v, g, S0, S_T = ctx.saved_tensors
        prev = ctx.prev
        sizes, b, bq, meta, g_sk = _setup(q, v, g, ctx.chunk_size, prev)
        N, T, K, V, G, NC = sizes
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dS_T = torch.zeros_like(S_T) if dS_T is None else dS_T.contiguous()
        h, _ = _states(k, v, b, bq, S0, sizes, meta, g_sk)  # recomputed, not kept
        A = _scores(q, k, b, bq, sizes, meta, g_sk, prev)
        dh, dS0 = _states(q, do, b, bq, dS_T, sizes, meta, g_sk, reverse=True)
        dv = torch.empty_like(v)
        dA = torch.empty_like(A)
        _chunk_dv[(NC, N)](k, v, b, A, do, dh, dv, dA, T, K, V, G, g_sk, STRICT=int(prev),
                           **launch(q.dtype), **meta)
        dq, dk = (torch.empty(N, T, K, dtype=b.dtype, device=q.device) for _ in range(2))
        _chunk_dqk[(triton.cdiv(K, meta["BK"]) * (meta["C"] // SUB_ROWS), NC, N)](
            q, k, v, b, bq, h, dh, do, dA, dq, dk, T, K, V, G, g_sk, SCALAR=G == 1, **launch(q.dtype),
            **meta)
        # dL/dB_t for the global prefix sums B of the log-decays (q_t scaled by e^{B_t}, or by
        # e^{B_(t-1)} with prev; k_t by e^{-B_t}); dg_t sums it from t on
        q, k = q.to(dq.dtype), k.to(dk.dtype)
        if prev:
            dB = -k * dk
            dB[:, :-1] += (q * dq)[:, 1:]
        else:
            dB = q * dq - k * dk
            own = (do.to(dq.dtype) * v.to(dq.dtype)).sum(-1, keepdim=True)  # dA_tt
            dq += own * k
            dk += own * q
        dB[:, -1] += (S_T * dS_T.to(S_T.dtype)).sum(-1)
        dg = dB.flip(1).cumsum(1).flip(1)
        if G == 1:
            dg = dg.sum(-1, keepdim=True)
        return dq.to(do.dtype), dk.to(do.dtype), dv, dg.to(g.dtype), dS0.to(S0.dtype), None, None


def chunk_linear_attention(q, k, v, log_decay, S0=None, chunk_size=64, prev=False):
    """Gated linear attention (as rcc.runtime.chunk.chunk_linear_attention), by Triton kernels.
    q, k [N, T, K]; v [N, T, V]; log_decay [N, T, K] (per key) or [N, T, 1] (scalar); S0
    [N, K, V] or None (zeros). Returns (o [N, T, V], S_T [N, K, V]). chunk_size is rounded to a
    power of two from 16 to 64 steps. prev: o_t reads the state before step t (RWKV-6's form)."""
    N, T, K = q.shape
    V = v.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    check([q, k, v, log_decay, S0], "chunk_linear_attention (backend 'triton')")
    if T == 0:
        return q.new_zeros(N, 0, V), S0.clone()
    return _ChunkGLA.apply(q, k, v, log_decay, S0, chunk_size, bool(prev))
