"""The gated delta rule and DeltaProduct chunkwise in Triton (backend triton, plan chunk): the
contract of rcc.runtime.chunk.chunk_delta_rule. Each token is n_h micro-steps (the gate on the
first, the read-out after the last): S_s = a_s S_{s-1} + k_s delta_s^T, delta_s = u_s - beta_s
(a_s S_{s-1})^T k_s.

A chunk holds CT tokens, their micro-steps in PL slots (64 when n_h <= 64: CT is the largest power
of two with CT n_h <= 64; slots past CT n_h are identity steps). A query lives in its token's last
slot, so every product of a chunk is [PL, PL] or [PL, block]. With S the state entering the
chunk and gam the log-gates summed from the chunk start (per token, so e^{gam_s - gam_r} <= 1 for
r <= s, and the gradient of an exponent between slots of one token is exactly 0):
    A[s, r] = beta_s e^{gam_s - gam_r} k_s.k_r (r < s),  T = (I + A)^{-1},
    W = T diag(beta e^gam) K,  U~ = T U                               (`_delta_wy`, per chunk)
    Delta = U~ - W S,  S' = e^{gam_L} S + (K e^{gam_L - gam})^T Delta  (`_delta_states`, in order)
    o = (Q e^gam) S + Aqk Delta,  Aqk[s, r] = e^{gam_s - gam_r} q_s.k_r (r <= s)   (`_delta_output`)
T is found blockwise: each 16 x 16 diagonal block by forward substitution, then the blocks below it
(T_ij = -T_ii sum_m A_im T_mj) by tl.dot, through a scratch buffer.

Backward, with dO and dS' (the states and the WY form recomputed, not kept):
    dDelta = Aqk^T dO + Kd dS',  dS = e^{gam_L} dS' + (Q e^gam)^T dO - W^T dDelta   (in reverse)
    dU = T^T dDelta,  dW = -dDelta S^T,  dKg = T^T dW,  dA = -(dU U~^T + dKg W^T) below the diagonal
and the log-gates' gradient from every exponent (value times its cotangent), gathered per token
and summed from the chunk's end (torch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_gla import SUB, SUB_ROWS, _dot, _nth_chunk, _state_slice, _tile, block, kept, launch
from .common import accumulator, check, dot_type


@triton.jit
def _slots(c, T, NH: tl.constexpr, CT: tl.constexpr, PL: tl.constexpr):
    """Chunk c's slots: index, token (global), micro-step (global), valid, holds a query."""
    ss = tl.arange(0, PL)
    tok = c * CT + tl.minimum(ss // NH, CT - 1)
    valid = (ss < CT * NH) & (tok < T)
    return ss, tok, tok * NH + ss % NH, valid, valid & (ss % NH == NH - 1)


@triton.jit
def _gates(gc_ptr, n, c, ss, NC, NH: tl.constexpr, CT: tl.constexpr, ACC: tl.constexpr):
    """The log-gates summed from the chunk start, per slot (the slot's token), and at its end."""
    first = n * NC * CT + c * CT
    gam = tl.load(gc_ptr + first + tl.minimum(ss // NH, CT - 1)).to(ACC)
    return gam, tl.load(gc_ptr + first + CT - 1).to(ACC)


@triton.jit
def _substitute(A, rr):
    """(I + A)^{-1} of a strictly lower triangular [SUB, SUB] block, a row at a time."""
    X = tl.where(rr[:, None] == rr[None, :], 1.0, 0.0).to(A.dtype)
    for r in range(1, SUB):
        a_r = tl.sum(tl.where(rr[:, None] == r, A, 0.0), 0)  # row r of A
        row = tl.where(rr == r, 1.0, 0.0) - tl.sum(a_r[:, None] * X, 0)
        X = tl.where(rr[:, None] == r, row[None, :], X)
    return X


@triton.jit(do_not_specialize=["T"])
def _delta_wy(k_ptr, u_ptr, beta_ptr, gc_ptr, a_ptr, tinv_ptr, w_ptr, uw_ptr, T, K, V,
              ACC: tl.constexpr, DOT: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr,
              PL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per (chunk, row): T = (I + A)^{-1} (kept), W = T diag(beta e^gam) K, U~ = T U."""
    c, n = tl.program_id(0), tl.program_id(1)
    NC = tl.num_programs(0)
    ss, tok, micro, valid, _ = _slots(c, T, NH, CT, PL)
    gam, _ = _gates(gc_ptr, n, c, ss, NC, NH, CT, ACC)
    beta = tl.load(beta_ptr + n * T * NH + micro, mask=valid, other=0.0).to(ACC)
    kk = tl.zeros((PL, PL), ACC)
    for kb in range(0, tl.cdiv(K, BK)):
        cols = kb * BK + tl.arange(0, BK)
        k = _tile(k_ptr, n * T * NH + micro, cols, valid, cols < K, K, ACC)
        kk += _dot(k, tl.trans(k), ACC, DOT)
    below = ss[None, :] < ss[:, None]
    A = tl.where(below, beta[:, None] * kk * tl.exp(tl.where(below, gam[:, None] - gam[None, :], 0.0)), 0.0)
    rows = n * NC * PL + c * PL  # the chunk's first row in the [N, NC * PL, ...] buffers
    tl.store(a_ptr + (rows + ss)[:, None] * PL + ss[None, :], A)
    tl.debug_barrier()
    rr = tl.arange(0, SUB)
    for i in range(0, PL // SUB):  # block row i of T, from the rows above it
        ri = rows + i * SUB + rr
        Tii = _substitute(tl.load(a_ptr + ri[:, None] * PL + (rr + i * SUB)[None, :]), rr)
        tl.store(tinv_ptr + ri[:, None] * PL + (rr + i * SUB)[None, :], Tii)
        for j in range(0, i):
            acc = tl.zeros((SUB, SUB), ACC)
            for m in range(j, i):
                Aim = tl.load(a_ptr + ri[:, None] * PL + (rr + m * SUB)[None, :])
                Tmj = tl.load(tinv_ptr + (rows + m * SUB + rr)[:, None] * PL + (rr + j * SUB)[None, :])
                acc += _dot(Aim, Tmj, ACC, ACC)
            tl.store(tinv_ptr + ri[:, None] * PL + (rr + j * SUB)[None, :], -_dot(Tii, acc, ACC, ACC))
        for j in range(i + 1, PL // SUB):
            tl.store(tinv_ptr + ri[:, None] * PL + (rr + j * SUB)[None, :], tl.zeros((SUB, SUB), ACC))
        tl.debug_barrier()
    Tinv = tl.load(tinv_ptr + (rows + ss)[:, None] * PL + ss[None, :])
    scale = beta * tl.exp(gam)
    for kb in range(0, tl.cdiv(K, BK)):
        cols = kb * BK + tl.arange(0, BK)
        k = _tile(k_ptr, n * T * NH + micro, cols, valid, cols < K, K, ACC) * scale[:, None]
        tl.store(w_ptr + (rows + ss)[:, None] * K + cols[None, :], _dot(Tinv, k, ACC, DOT),
                 mask=(cols < K)[None, :])
    for vb in range(0, tl.cdiv(V, BV)):
        cols = vb * BV + tl.arange(0, BV)
        u = _tile(u_ptr, n * T * NH + micro, cols, valid, cols < V, V, ACC)
        tl.store(uw_ptr + (rows + ss)[:, None] * V + cols[None, :], _dot(Tinv, u, ACC, DOT),
                 mask=(cols < V)[None, :])


@triton.jit(do_not_specialize=["T", "NC"])
def _delta_states(q_ptr, k_ptr, do_ptr, gc_ptr, w_ptr, x_ptr, s_in_ptr, states_ptr, delta_ptr,
                  s_out_ptr, T, NC, K, V, REVERSE: tl.constexpr, ACC: tl.constexpr,
                  DOT: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, PL: tl.constexpr,
                  PK: tl.constexpr, BV: tl.constexpr):
    """The sequential part, one program per (value block, row), all keys (Delta needs W S).
    Forward (x = U~, s_in = S_0): states[c] = the state entering chunk c, delta = Delta, s_out =
    S_T. REVERSE (x = Aqk^T dO, s_in = dS_T): states[c] = the gradient of the state leaving chunk
    c, delta = dDelta, s_out = dS_0."""
    iv, n = tl.program_id(0), tl.program_id(1)
    kc, vv = tl.arange(0, PK), iv * BV + tl.arange(0, BV)
    kmask, vmask = kc < K, vv < V
    s_off, s_mask, S = _state_slice(s_in_ptr, n, kc, vv, K, V, ACC)
    for i in range(0, NC):
        c = _nth_chunk(i, NC, REVERSE)
        ss, tok, micro, valid, is_q = _slots(c, T, NH, CT, PL)
        gam, gam_L = _gates(gc_ptr, n, c, ss, NC, NH, CT, ACC)
        rows = n * NC * PL + c * PL + ss
        tl.store(states_ptr + (n * NC + c) * K * V + s_off, S, mask=s_mask)
        kd = _tile(k_ptr, n * T * NH + micro, kc, valid, kmask, K, ACC) * tl.exp(gam_L - gam)[:, None]
        w = _tile(w_ptr, rows, kc, ss < PL, kmask, K, ACC)
        x = _tile(x_ptr, rows, vv, ss < PL, vmask, V, ACC)
        if REVERSE:
            d_delta = x + _dot(kd, S, ACC, DOT)
            tl.store(delta_ptr + rows[:, None] * V + vv[None, :], d_delta, mask=vmask[None, :])
            q = _tile(q_ptr, n * T + tok, kc, is_q, kmask, K, ACC) * tl.exp(gam)[:, None]
            do = _tile(do_ptr, n * T + tok, vv, is_q, vmask, V, ACC)
            S = (tl.exp(gam_L) * S + _dot(tl.trans(q), do, ACC, DOT)
                 - _dot(tl.trans(w), d_delta, ACC, DOT))
        else:
            delta = x - _dot(w, S, ACC, DOT)
            tl.store(delta_ptr + rows[:, None] * V + vv[None, :], delta, mask=vmask[None, :])
            S = tl.exp(gam_L) * S + _dot(tl.trans(kd), delta, ACC, DOT)
    tl.store(s_out_ptr + n * K * V + s_off, S, mask=s_mask)


@triton.jit
def _query_scores(q_ptr, k_ptr, n, T, K, tok, micro, valid, is_q, gam, ss, ACC: tl.constexpr,
                  DOT: tl.constexpr, NH: tl.constexpr, PL: tl.constexpr, BK: tl.constexpr):
    """Aqk [PL, PL]: e^{gam_s - gam_r} q_s.k_r for r <= s (rows: the query slots)."""
    qk = tl.zeros((PL, PL), ACC)
    for kb in range(0, tl.cdiv(K, BK)):
        cols = kb * BK + tl.arange(0, BK)
        q = _tile(q_ptr, n * T + tok, cols, is_q, cols < K, K, ACC)
        qk += _dot(q, tl.trans(_tile(k_ptr, n * T * NH + micro, cols, valid, cols < K, K, ACC)), ACC, DOT)
    seen = ss[None, :] <= ss[:, None]
    return tl.where(seen, qk * tl.exp(tl.where(seen, gam[:, None] - gam[None, :], 0.0)), 0.0)


@triton.jit(do_not_specialize=["T"])
def _delta_output(q_ptr, k_ptr, gc_ptr, states_ptr, delta_ptr, do_ptr, out_ptr, T, K, V,
                  BACKWARD: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, NH: tl.constexpr,
                  CT: tl.constexpr, PL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per (value block, chunk, row): o = (Q e^gam) S + Aqk Delta, or BACKWARD, the part of
    dDelta within the chunk, Aqk^T dO."""
    iv, c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC = tl.num_programs(1)
    vv = iv * BV + tl.arange(0, BV)
    ss, tok, micro, valid, is_q = _slots(c, T, NH, CT, PL)
    gam, _ = _gates(gc_ptr, n, c, ss, NC, NH, CT, ACC)
    Aqk = _query_scores(q_ptr, k_ptr, n, T, K, tok, micro, valid, is_q, gam, ss, ACC, DOT, NH, PL, BK)
    rows = n * NC * PL + c * PL + ss
    if BACKWARD:
        do = _tile(do_ptr, n * T + tok, vv, is_q, vv < V, V, ACC)
        tl.store(out_ptr + rows[:, None] * V + vv[None, :], _dot(tl.trans(Aqk), do, ACC, DOT),
                 mask=(vv < V)[None, :])
    else:
        o = _dot(Aqk, _tile(delta_ptr, rows, vv, ss < PL, vv < V, V, ACC), ACC, DOT)
        for kb in range(0, tl.cdiv(K, BK)):
            cols = kb * BK + tl.arange(0, BK)
            q = _tile(q_ptr, n * T + tok, cols, is_q, cols < K, K, ACC) * tl.exp(gam)[:, None]
            S = _tile(states_ptr + (n * NC + c) * K * V, cols, vv, cols < K, vv < V, V, ACC)
            o += _dot(q, S, ACC, DOT)
        tl.store(out_ptr + (n * T + tok)[:, None] * V + vv[None, :], o,
                 mask=is_q[:, None] & (vv < V)[None, :])


@triton.jit(do_not_specialize=["T", "N"])  # a new length or batch never recompiles
def _delta_dqkw(q_ptr, k_ptr, gc_ptr, states_ptr, dstates_ptr, delta_ptr, ddelta_ptr, do_ptr,
                dq_ptr, dk_ptr, dw_ptr, dgam_ptr, dgl_ptr, T, K, V, N,
                ACC: tl.constexpr, DOT: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr,
                PL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per (key block, chunk, row): dq, dk through Aqk and Kd, dW = -dDelta S^T, and this key
    block's part of the log-gates' gradient (per slot, and at the chunk's end)."""
    ik, c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC = tl.num_programs(1)
    cols = ik * BK + tl.arange(0, BK)
    kmask = cols < K
    ss, tok, micro, valid, is_q = _slots(c, T, NH, CT, PL)
    gam, gam_L = _gates(gc_ptr, n, c, ss, NC, NH, CT, ACC)
    rows = n * NC * PL + c * PL + ss
    dAqk = tl.zeros((PL, PL), ACC)
    dQS = tl.zeros((PL, BK), ACC)
    dW = tl.zeros((PL, BK), ACC)
    dKd = tl.zeros((PL, BK), ACC)
    d_end = tl.zeros((BK,), ACC)  # dS' * S summed over values
    for vb in range(0, tl.cdiv(V, BV)):
        vv = vb * BV + tl.arange(0, BV)
        vmask = vv < V
        do = _tile(do_ptr, n * T + tok, vv, is_q, vmask, V, ACC)
        delta = _tile(delta_ptr, rows, vv, ss < PL, vmask, V, ACC)
        d_delta = _tile(ddelta_ptr, rows, vv, ss < PL, vmask, V, ACC)
        S = _tile(states_ptr + (n * NC + c) * K * V, cols, vv, kmask, vmask, V, ACC)
        dS = _tile(dstates_ptr + (n * NC + c) * K * V, cols, vv, kmask, vmask, V, ACC)
        dAqk += _dot(do, tl.trans(delta), ACC, DOT)
        dQS += _dot(do, tl.trans(S), ACC, DOT)
        dW -= _dot(d_delta, tl.trans(S), ACC, DOT)
        dKd += _dot(delta, tl.trans(dS), ACC, DOT)
        d_end += tl.sum(dS * S, 1)
    tl.store(dw_ptr + rows[:, None] * K + cols[None, :], dW, mask=kmask[None, :])
    seen = ss[None, :] <= ss[:, None]
    E = tl.where(seen, tl.exp(tl.where(seen, gam[:, None] - gam[None, :], 0.0)), 0.0)
    dAqk = tl.where(seen, dAqk, 0.0) * E
    q = _tile(q_ptr, n * T + tok, cols, is_q, kmask, K, ACC)
    k = _tile(k_ptr, n * T * NH + micro, cols, valid, kmask, K, ACC)
    e_gam, to_end = tl.exp(gam), tl.exp(gam_L - gam)
    dq = _dot(dAqk, k, ACC, DOT) + e_gam[:, None] * dQS
    tl.store(dq_ptr + (n * T + tok)[:, None] * K + cols[None, :], dq,
             mask=is_q[:, None] & kmask[None, :])
    dk = _dot(tl.trans(dAqk), q, ACC, DOT) + to_end[:, None] * dKd
    tl.store(dk_ptr + (n * T * NH + micro)[:, None] * K + cols[None, :], dk,
             mask=valid[:, None] & kmask[None, :])
    # exponents between slots of different tokens only (within a token they are 0 exactly)
    other = (ss[None, :] // NH) < (ss[:, None] // NH)
    X = tl.where(other, dAqk * _dot(q, tl.trans(k), ACC, DOT), 0.0)
    y = tl.sum(dKd * k, 1) * to_end
    last = (ss // NH) == CT - 1
    dgam = tl.sum(X, 1) - tl.sum(X, 0) + e_gam * tl.sum(dQS * q, 1) - tl.where(last, 0.0, y)
    part = ik * N + n
    tl.store(dgam_ptr + part * NC * PL + c * PL + ss, dgam)
    tl.store(dgl_ptr + part * NC + c, tl.sum(tl.where(last, 0.0, y), 0) + tl.exp(gam_L) * tl.sum(d_end, 0))


@triton.jit(do_not_specialize=["T"])
def _delta_wy_backward(k_ptr, uw_ptr, beta_ptr, gc_ptr, tinv_ptr, w_ptr, dw_ptr, ddelta_ptr,
                       du_ptr, dk_ptr, dbeta_ptr, dgam_ptr, T, K, V, ACC: tl.constexpr,
                       DOT: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, PL: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr):
    """Per (chunk, row), through the WY form: dU = T^T dDelta, dKg = T^T dW, dA = -(dU U~^T +
    dKg W^T) below the diagonal; then dk (added to the partial one), dbeta and the log-gates'
    gradient per slot from A and Kg."""
    c, n = tl.program_id(0), tl.program_id(1)
    NC = tl.num_programs(0)
    ss, tok, micro, valid, _ = _slots(c, T, NH, CT, PL)
    gam, _ = _gates(gc_ptr, n, c, ss, NC, NH, CT, ACC)
    beta = tl.load(beta_ptr + n * T * NH + micro, mask=valid, other=0.0).to(ACC)
    rows = n * NC * PL + c * PL + ss
    Tt = tl.trans(tl.load(tinv_ptr + rows[:, None] * PL + ss[None, :]).to(ACC))
    dA = tl.zeros((PL, PL), ACC)
    for vb in range(0, tl.cdiv(V, BV)):
        vv = vb * BV + tl.arange(0, BV)
        dU = _dot(Tt, _tile(ddelta_ptr, rows, vv, ss < PL, vv < V, V, ACC), ACC, DOT)
        tl.store(du_ptr + (n * T * NH + micro)[:, None] * V + vv[None, :], dU,
                 mask=valid[:, None] & (vv < V)[None, :])
        dA -= _dot(dU, tl.trans(_tile(uw_ptr, rows, vv, ss < PL, vv < V, V, ACC)), ACC, DOT)
    kk = tl.zeros((PL, PL), ACC)
    kg_dot = tl.zeros((PL,), ACC)  # dKg_s . k_s
    for kb in range(0, tl.cdiv(K, BK)):
        cols = kb * BK + tl.arange(0, BK)
        dKg = _dot(Tt, _tile(dw_ptr, rows, cols, ss < PL, cols < K, K, ACC), ACC, DOT)
        dA -= _dot(dKg, tl.trans(_tile(w_ptr, rows, cols, ss < PL, cols < K, K, ACC)), ACC, DOT)
        k = _tile(k_ptr, n * T * NH + micro, cols, valid, cols < K, K, ACC)
        kk += _dot(k, tl.trans(k), ACC, DOT)
        kg_dot += tl.sum(dKg * k, 1)
    below = ss[None, :] < ss[:, None]
    E = tl.where(below, tl.exp(tl.where(below, gam[:, None] - gam[None, :], 0.0)), 0.0)
    dA = tl.where(below, dA, 0.0)
    e_gam = tl.exp(gam)
    dbeta = tl.sum(dA * E * kk, 1) + e_gam * kg_dot
    tl.store(dbeta_ptr + n * T * NH + micro, dbeta, mask=valid)
    X = tl.where((ss[None, :] // NH) < (ss[:, None] // NH), dA * beta[:, None] * E * kk, 0.0)
    dgam = tl.sum(X, 1) - tl.sum(X, 0) + beta * e_gam * kg_dot
    tl.store(dgam_ptr + n * NC * PL + c * PL + ss, dgam)
    M = dA * beta[:, None] * E
    for kb in range(0, tl.cdiv(K, BK)):
        cols = kb * BK + tl.arange(0, BK)
        k = _tile(k_ptr, n * T * NH + micro, cols, valid, cols < K, K, ACC)
        dKg = _dot(Tt, _tile(dw_ptr, rows, cols, ss < PL, cols < K, K, ACC), ACC, DOT)
        dk = _dot(M, k, ACC, DOT) + _dot(tl.trans(M), k, ACC, DOT) + (beta * e_gam)[:, None] * dKg
        at = dk_ptr + (n * T * NH + micro)[:, None] * K + cols[None, :]
        m = valid[:, None] & (cols < K)[None, :]
        tl.store(at, tl.load(at, mask=m, other=0.0) + dk, mask=m)


def slots(n_h, chunk_size):
    """(CT tokens a chunk, PL slots): CT a power of two of at most chunk_size tokens whose n_h
    micro-steps fit 64 slots (one token when n_h > 64), PL their count rounded up to a power of
    two (16 at least: the smallest tl.dot)."""
    most = 1 << (max(1, 64 // n_h).bit_length() - 1)
    CT = max(1, min(most, triton.next_power_of_2(max(1, int(chunk_size)))))
    return CT, max(SUB_ROWS, triton.next_power_of_2(CT * n_h))


def _setup(q, k, g, chunk_size):
    """Sizes, constexprs, and the log-gates summed from each chunk's start [N, NC * CT]."""
    N, T, NH, K = k.shape
    CT, PL = slots(NH, chunk_size)  # not T's
    NC = triton.cdiv(T, CT)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    gc = torch.zeros(N, NC * CT, dtype=wide, device=q.device)
    if g is not None:
        gc[:, :T] = g
        gc = gc.view(N, NC, CT).cumsum(-1).view(N, NC * CT)
    meta = dict(ACC=accumulator(q.dtype), DOT=dot_type(q.dtype), NH=NH, CT=CT, PL=PL)
    return (N, T, NH, K, NC), gc, meta


def _forward_pass(q, k, u, beta, gc, S0, sizes, meta):
    """W, U~, T (the WY form), the chunk states and Delta, S_T."""
    N, T, NH, K, NC = sizes
    V, PL, dev, wide = u.shape[-1], meta["PL"], q.device, gc.dtype
    blocks = dict(BK=block(K, q.dtype), BV=block(V, q.dtype))
    A, tinv = (torch.empty(N, NC * PL, PL, dtype=wide, device=dev) for _ in range(2))
    w = torch.empty(N, NC * PL, K, dtype=kept(q.dtype), device=dev)
    uw = torch.empty(N, NC * PL, V, dtype=kept(q.dtype), device=dev)
    _delta_wy[(NC, N)](k, u, beta, gc, A, tinv, w, uw, T, K, V, **launch(q.dtype), **meta, **blocks)
    h = torch.empty(N, NC, K, V, dtype=kept(q.dtype), device=dev)
    delta = torch.empty(N, NC * PL, V, dtype=kept(q.dtype), device=dev)
    S_T = torch.empty(N, K, V, dtype=wide, device=dev)
    tiles = state_tiles(K)
    _delta_states[(triton.cdiv(V, tiles["BV"]), N)](q, k, q, gc, w, uw, S0, h, delta, S_T, T, NC, K, V,
                                                   REVERSE=False, **tiles, **launch(q.dtype), **meta)
    return dict(tinv=tinv, w=w, uw=uw, h=h, delta=delta, S_T=S_T, blocks=blocks)


def state_tiles(K) -> dict:
    """The tiles of a sequential kernel that holds every key of the state (the delta rule's W S,
    the diagonal-plus-rank-one reads P S need them): all K keys, 32 value columns a program."""
    return dict(PK=max(16, triton.next_power_of_2(K)), BV=32)


class _ChunkDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, u, beta, g, S0, chunk_size):
        N, T, NH, K = k.shape
        V = u.shape[-1]
        q, S0 = q.contiguous(), S0.contiguous()
        k2, u2, beta2 = (x.reshape(N, T * NH, -1).contiguous() for x in (k, u, beta))
        sizes, gc, meta = _setup(q, k, g, chunk_size)
        f = _forward_pass(q, k2, u2, beta2, gc, S0, sizes, meta)
        o = torch.empty(N, T, V, dtype=q.dtype, device=q.device)
        NC = sizes[-1]
        _delta_output[(triton.cdiv(V, f["blocks"]["BV"]), NC, N)](
            q, k2, gc, f["h"], f["delta"], q, o, T, K, V, BACKWARD=False, **launch(q.dtype), **meta,
            **f["blocks"])
        ctx.save_for_backward(q, k, u, beta, S0, *([] if g is None else [g]))
        ctx.chunk_size = chunk_size
        return o, f["S_T"].to(S0.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, do, dS_T):
        q, k, u, beta, S0, *gate = ctx.saved_tensors
        g = gate[0] if gate else None
        N, T, NH, K = k.shape
        V = u.shape[-1]
        k2, u2, beta2 = (x.reshape(N, T * NH, -1).contiguous() for x in (k, u, beta))
        sizes, gc, meta = _setup(q, k, g, ctx.chunk_size)
        NC, PL, dev, wide = sizes[-1], meta["PL"], q.device, gc.dtype
        f = _forward_pass(q, k2, u2, beta2, gc, S0, sizes, meta)
        blocks = f["blocks"]
        do = torch.zeros(N, T, V, dtype=q.dtype, device=dev) if do is None else do.contiguous()
        dS_T = torch.zeros(N, K, V, dtype=wide, device=dev) if dS_T is None else dS_T.contiguous()
        intra = torch.empty(N, NC * PL, V, dtype=wide, device=dev)
        _delta_output[(triton.cdiv(V, blocks["BV"]), NC, N)](
            q, k2, gc, f["h"], f["delta"], do, intra, T, K, V, BACKWARD=True, **launch(q.dtype),
            **meta, **blocks)
        dh = torch.empty(N, NC, K, V, dtype=kept(q.dtype), device=dev)
        d_delta = torch.empty(N, NC * PL, V, dtype=wide, device=dev)
        dS0 = torch.empty(N, K, V, dtype=wide, device=dev)
        tiles = state_tiles(K)
        _delta_states[(triton.cdiv(V, tiles["BV"]), N)](
            q, k2, do, gc, f["w"], intra, dS_T, dh, d_delta, dS0, T, NC, K, V, REVERSE=True, **tiles,
            **launch(q.dtype), **meta)
        parts = triton.cdiv(K, blocks["BK"])
        dq = torch.empty(N, T, K, dtype=wide, device=dev)
        dk = torch.empty(N, T * NH, K, dtype=wide, device=dev)
        dw = torch.empty(N, NC * PL, K, dtype=wide, device=dev)
        dgam = torch.empty(parts + 1, N, NC * PL, dtype=wide, device=dev)
        d_end = torch.empty(parts, N, NC, dtype=wide, device=dev)
        _delta_dqkw[(parts, NC, N)](q, k2, gc, f["h"], dh, f["delta"], d_delta, do, dq, dk, dw, dgam,
                                    d_end, T, K, V, N, **launch(q.dtype), **meta, **blocks)
        du = torch.empty(N, T * NH, V, dtype=wide, device=dev)
        dbeta = torch.empty(N, T * NH, dtype=wide, device=dev)
        _delta_wy_backward[(NC, N)](k2, f["uw"], beta2, gc, f["tinv"], f["w"], dw, d_delta, du, dk,
                                    dbeta, dgam[parts], T, K, V, **launch(q.dtype), **meta, **blocks)
        dg = None
        if g is not None:  # per slot -> per token, then summed from each chunk's end
            CT = meta["CT"]
            per_token = dgam.sum(0).view(N, NC, PL)[:, :, :CT * NH].reshape(N, NC, CT, NH).sum(-1)
            per_token[:, :, -1] += d_end.sum(0)
            dg = per_token.flip(-1).cumsum(-1).flip(-1).reshape(N, NC * CT)[:, :T].to(g.dtype)
        return (dq.to(q.dtype), dk.view(N, T, NH, K).to(k.dtype), du.view(N, T, NH, V).to(u.dtype),
                dbeta.view(N, T, NH).to(beta.dtype), dg, dS0.to(S0.dtype), None)


def chunk_delta_rule(q, k, u, beta, log_decay=None, S0=None, chunk_size=64):
    """Gated delta rule / DeltaProduct (as rcc.runtime.chunk.chunk_delta_rule), by Triton kernels.
    q [N, T, K]; k [N, T, n_h, K]; u [N, T, n_h, V] (= beta * v); beta [N, T, n_h]; log_decay
    [N, T] or None (no gate); S0 [N, K, V] or None (zeros). Returns (o [N, T, V], S_T [N, K, V]).
    chunk_size counts tokens, rounded to a power of two whose micro-steps fit 64 slots."""
    N, T, NH, K = k.shape
    V = u.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    tensors = [q, k, u, beta, S0] + ([] if log_decay is None else [log_decay])
    check(tensors, "chunk_delta_rule (backend 'triton')")
    if T == 0:
        return q.new_zeros(N, 0, V), S0.clone()
    return _ChunkDelta.apply(q, k, u, beta, log_decay, S0, chunk_size)
