"""The gated delta rule / DeltaProduct chunkwise in Triton (backend triton, plan chunk): the
contract of rcc.runtime.chunk.chunk_delta_rule (the algorithm: the comment above `_delta_chunk`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import accumulator, check, interpreted, tuned

MAX_CHUNK = 16  # the pairwise decays are a [C, C, K] tile


@triton.jit
def _mm(a, b, MODE: tl.constexpr):
    # a [M, K] @ b [K, N]: MODE 0 products and a sum (any size, any float type); 1 tl.dot in full
    # precision; 2 tl.dot on bfloat16 operands, float32 accumulation (half-precision inputs)
    if MODE == 0:
        return tl.sum(a[:, :, None] * b[None, :, :], 1)
    elif MODE == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16)).to(a.dtype)


@triton.jit
def _state_slice(K, V, PK: tl.constexpr, BV: tl.constexpr):
    # this program's row n and its [K, BV] slice of the [K, V] state: keys, value columns,
    # offsets and mask
    n, iv = tl.program_id(0), tl.program_id(1)
    kk = tl.arange(0, PK)
    vv = iv * BV + tl.arange(0, BV)
    return n, kk, vv, kk[:, None] * V + vv[None, :], (kk < K)[:, None] & (vv < V)[None, :]


@triton.jit
def _row(x, rows, i):
    # row i of the tile x (rows: its row indices), as a vector
    return tl.sum(tl.where(rows[:, None] == i, x, 0.0), 0)


def dot_mode(dtype, *sizes) -> int:
    """_mm's MODE: tl.dot where the GPU compiler takes it (every size at least 16, not float64),
    on bfloat16 operands for half-precision inputs; else products and sums (the interpreter)."""
    if interpreted() or dtype == torch.float64 or min(sizes) < 16:
        return 0
    return 2 if dtype in (torch.bfloat16, torch.float16) else 1


def _wide(dtype):
    """The float type of the kernels' work buffers (saved chunk states, partial gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the gated delta rule / DeltaProduct, chunkwise (UT transform) -------------------------------
# Contract of rcc.runtime.chunk.chunk_delta_rule: each token is n_h micro-steps s (the gate on the
# first, the read-out after the last): S_s = a_s S_{s-1} + k_s delta_s^T, delta_s = u_s - beta_s
# (a_s S_{s-1})^T k_s. A chunk holds C tokens, L = C n_h micro-steps (padded to PL, a power of two,
# with identity steps). With S the state entering the chunk, gam the log-gates from the chunk start
# and seg(r, s] those of the tokens after r's up to s's:
#   A[s, r] = beta_s e^{seg(r, s]} k_s.k_r (r < s),  T = (I + A)^{-1} (forward substitution)
#   Delta = T (U - Kg S),  Kg = diag(beta e^{gam}) K          (the WY form: U~ = T U, W = T Kg)
#   o = diag(e^{gam}) Q S + Aqk Delta,  Aqk[t, r] = e^{seg(r, t]} q_t.k_r (tokens of r <= t)
#   S' = e^{gam_L} S + Kd^T Delta,  Kd = diag(e^{seg(r, L]}) K
# Every exponent is a segment of log-gates summed directly (the [.., C] masked sums below), as in
# the chunked GLA kernels. Backward, per chunk in reverse from its saved state, with dO and dS':
#   dDelta = Aqk^T dO + Kd dS',  R = T^T dDelta (= dU),  dA = -R Delta^T (strictly lower),
#   dKg = -R S^T,  dS = Q_g^T dO + e^{gam_L} dS' - Kg^T R,  and each exponent's gradient (the value
#   it scales times its cotangent) summed back onto the tokens' log-gates in its segment.

@triton.jit
def _delta_chunk(q_ptr, k_ptr, u_ptr, beta_ptr, g_ptr, n, c, kk, vv, T, K, V,
                 ACC: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr, NH: tl.constexpr,
                 PL: tl.constexpr):
    """A chunk's tiles: q [C, PK], k [PL, PK], u [PL, BV], beta [PL], the log-gates g [C], and
    the segment sums of g the chunk's exponents need."""
    tt = tl.arange(0, C)
    ss = tl.arange(0, PL)
    tok = ss // NH  # the token (in the chunk) of each micro-step
    t_ok = c * C + tt < T
    s_ok = (ss < C * NH) & (c * C + tok < T)
    micro = ((n * T + c * C + tok) * NH + ss % NH)[:, None]
    q = tl.load(q_ptr + (n * T + c * C + tt)[:, None] * K + kk[None, :],
                mask=t_ok[:, None] & (kk < K)[None, :], other=0.0).to(ACC)
    k = tl.load(k_ptr + micro * K + kk[None, :], mask=s_ok[:, None] & (kk < K)[None, :],
                other=0.0).to(ACC)
    u = tl.load(u_ptr + micro * V + vv[None, :], mask=s_ok[:, None] & (vv < V)[None, :],
                other=0.0).to(ACC)
    beta = tl.load(beta_ptr + (n * T + c * C + tok) * NH + ss % NH, mask=s_ok, other=0.0).to(ACC)
    if HAS_GATE:
        g = tl.load(g_ptr + n * T + c * C + tt, mask=t_ok, other=0.0).to(ACC)
    else:
        g = tl.zeros((C,), ACC)
    return q, k, u, beta, g, tt, ss, tok, t_ok, s_ok


@triton.jit
def _segments(g, tt, tok):
    """seg[s, r] (tokens after r's, up to s's), seg_q[t, r] (after r's, up to t), gam[s] (up to
    s's), gam_t[t] (up to t), to_end[r] (after r's), total: each summed directly."""
    p = tt[None, None, :]
    seg = tl.sum(tl.where((tok[None, :, None] < p) & (p <= tok[:, None, None]), g[None, None, :], 0.0), 2)
    seg_q = tl.sum(tl.where((tok[None, :, None] < p) & (p <= tt[:, None, None]), g[None, None, :], 0.0), 2)
    gam = tl.sum(tl.where(tt[None, :] <= tok[:, None], g[None, :], 0.0), 1)
    gam_t = tl.cumsum(g, 0)
    to_end = tl.sum(tl.where(tt[None, :] > tok[:, None], g[None, :], 0.0), 1)
    return seg, seg_q, gam, gam_t, to_end, tl.sum(g, 0)


@triton.jit
def _unit_lower_inverse(A, ss, PL: tl.constexpr):
    """(I + A)^{-1} for A strictly lower triangular: each row from the rows above it."""
    Tinv = tl.zeros((PL, PL), A.dtype)
    for s in range(0, PL):
        row = tl.where(ss == s, 1.0, 0.0) - tl.sum(_row(A, ss, s)[:, None] * Tinv, 0)
        Tinv = tl.where(ss[:, None] == s, row[None, :], Tinv)
    return Tinv


@tuned("C", "PK", "BV")  # warps per program
@triton.jit(do_not_specialize=["T"])  # a new length or batch never recompiles
def _delta_forward(q_ptr, k_ptr, u_ptr, beta_ptr, g_ptr, s0_ptr, o_ptr, sT_ptr, h_ptr, T, K, V,
                   SAVE: tl.constexpr, HAS_GATE: tl.constexpr, ACC: tl.constexpr,
                   MODE: tl.constexpr, C: tl.constexpr, NH: tl.constexpr, PL: tl.constexpr,
                   PK: tl.constexpr, BV: tl.constexpr):
    n, kk, vv, s_off, s_mask = _state_slice(K, V, PK, BV)
    S = tl.load(s0_ptr + n * K * V + s_off, mask=s_mask, other=0.0).to(ACC)
    n_chunks = tl.cdiv(T, C)
    for c in range(0, n_chunks):
        q, k, u, beta, g, tt, ss, tok, t_ok, s_ok = _delta_chunk(
            q_ptr, k_ptr, u_ptr, beta_ptr, g_ptr, n, c, kk, vv, T, K, V, ACC, HAS_GATE, C, NH, PL)
        if SAVE:
            tl.store(h_ptr + (n * n_chunks + c) * K * V + s_off, S, mask=s_mask)
        seg, seg_q, gam, gam_t, to_end, total = _segments(g, tt, tok)
        earlier = ss[None, :] < ss[:, None]
        A = tl.where(earlier, beta[:, None] * tl.exp(tl.where(earlier, seg, 0.0)) * _mm(k, tl.trans(k), MODE), 0.0)
        Tinv = _unit_lower_inverse(A, ss, PL)
        Kg = (beta * tl.exp(gam))[:, None] * k
        delta = _mm(Tinv, u - _mm(Kg, S, MODE), MODE)
        seen = tok[None, :] <= tt[:, None]
        Aqk = tl.where(seen, tl.exp(tl.where(seen, seg_q, 0.0)) * _mm(q, tl.trans(k), MODE), 0.0)
        o = _mm(tl.exp(gam_t)[:, None] * q, S, MODE) + _mm(Aqk, delta, MODE)
        tl.store(o_ptr + (n * T + c * C + tt)[:, None] * V + vv[None, :], o,
                 mask=t_ok[:, None] & (vv < V)[None, :])
        S = tl.exp(total) * S + _mm(tl.trans(tl.exp(to_end)[:, None] * k), delta, MODE)
    tl.store(sT_ptr + n * K * V + s_off, S, mask=s_mask)


@tuned("C", "PK", "BV")  # warps per program
@triton.jit(do_not_specialize=["T", "N"])  # a new length or batch never recompiles
def _delta_backward(q_ptr, k_ptr, u_ptr, beta_ptr, g_ptr, h_ptr, do_ptr, dsT_ptr, dq_ptr, dk_ptr,
                    du_ptr, dbeta_ptr, dg_ptr, ds0_ptr, T, K, V, N,
                    HAS_GATE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr,
                    C: tl.constexpr, NH: tl.constexpr, PL: tl.constexpr, PK: tl.constexpr,
                    BV: tl.constexpr):
    n, kk, vv, s_off, s_mask = _state_slice(K, V, PK, BV)
    dS = tl.load(dsT_ptr + n * K * V + s_off, mask=s_mask, other=0.0).to(ACC)
    n_chunks = tl.cdiv(T, C)
    for cr in range(0, n_chunks):
        c = n_chunks - 1 - cr
        q, k, u, beta, g, tt, ss, tok, t_ok, s_ok = _delta_chunk(
            q_ptr, k_ptr, u_ptr, beta_ptr, g_ptr, n, c, kk, vv, T, K, V, ACC, HAS_GATE, C, NH, PL)
        S = tl.load(h_ptr + (n * n_chunks + c) * K * V + s_off, mask=s_mask, other=0.0).to(ACC)
        do = tl.load(do_ptr + (n * T + c * C + tt)[:, None] * V + vv[None, :],
                     mask=t_ok[:, None] & (vv < V)[None, :], other=0.0).to(ACC)
        # the forward chunk again
        seg, seg_q, gam, gam_t, to_end, total = _segments(g, tt, tok)
        earlier = ss[None, :] < ss[:, None]
        e_seg = tl.where(earlier, tl.exp(tl.where(earlier, seg, 0.0)), 0.0)
        kk_dot = _mm(k, tl.trans(k), MODE)
        A = beta[:, None] * e_seg * kk_dot
        Tinv = _unit_lower_inverse(A, ss, PL)
        e_gam = tl.exp(gam)
        Kg = (beta * e_gam)[:, None] * k
        delta = _mm(Tinv, u - _mm(Kg, S, MODE), MODE)
        seen = tok[None, :] <= tt[:, None]
        e_q = tl.where(seen, tl.exp(tl.where(seen, seg_q, 0.0)), 0.0)
        qk = _mm(q, tl.trans(k), MODE)
        Aqk = e_q * qk
        e_t = tl.exp(gam_t)
        e_end = tl.exp(to_end)
        Kd = e_end[:, None] * k
        # adjoints
        d_delta = _mm(tl.trans(Aqk), do, MODE) + _mm(Kd, dS, MODE)
        R = _mm(tl.trans(Tinv), d_delta, MODE)  # = dU
        tl.store(du_ptr + ((n * T + c * C + tok) * NH + ss % NH)[:, None] * V + vv[None, :], R,
                 mask=s_ok[:, None] & (vv < V)[None, :])
        dA = tl.where(earlier, -_mm(R, tl.trans(delta), MODE), 0.0)
        dKg = -_mm(R, tl.trans(S), MODE)
        dAqk = tl.where(seen, _mm(do, tl.trans(delta), MODE), 0.0)
        dQg = _mm(do, tl.trans(S), MODE)
        dKd = _mm(delta, tl.trans(dS), MODE)
        dkk = dA * beta[:, None] * e_seg
        dq = _mm(dAqk * e_q, k, MODE) + e_t[:, None] * dQg
        dk = (_mm(dkk, k, MODE) + _mm(tl.trans(dkk), k, MODE) + _mm(tl.trans(dAqk * e_q), q, MODE)
              + (beta * e_gam)[:, None] * dKg + e_end[:, None] * dKd)
        dbeta = tl.sum(dA * e_seg * kk_dot, 1) + e_gam * tl.sum(dKg * k, 1)
        # the exponents' cotangents, then onto the log-gates of their segments
        d_seg = dA * A
        d_seg_q = dAqk * Aqk
        d_gam = tl.sum(dKg * Kg, 1)
        d_gam_t = tl.sum(dQg * q, 1) * e_t
        d_end = tl.sum(dKd * Kd, 1)
        d_total = tl.exp(total) * tl.sum(dS * S)
        p = tt[None, None, :]
        dg = (tl.sum(tl.sum(tl.where((tok[None, :, None] < p) & (p <= tok[:, None, None]),
                                     d_seg[:, :, None], 0.0), 0), 0)
              + tl.sum(tl.sum(tl.where((tok[None, :, None] < p) & (p <= tt[:, None, None]),
                                       d_seg_q[:, :, None], 0.0), 0), 0)
              + tl.sum(tl.where(tt[None, :] <= tok[:, None], d_gam[:, None], 0.0), 0)
              + tl.sum(tl.where(tt[None, :] <= tt[:, None], d_gam_t[:, None], 0.0), 0)
              + tl.sum(tl.where(tt[None, :] > tok[:, None], d_end[:, None], 0.0), 0)
              + d_total)
        part = (tl.program_id(1) * N + n) * T + c * C  # this value block's part
        tl.store(dq_ptr + (part + tt)[:, None] * K + kk[None, :], dq,
                 mask=t_ok[:, None] & (kk < K)[None, :])
        micro_part = (part + tok) * NH + ss % NH
        tl.store(dk_ptr + micro_part[:, None] * K + kk[None, :], dk,
                 mask=s_ok[:, None] & (kk < K)[None, :])
        tl.store(dbeta_ptr + micro_part, dbeta, mask=s_ok)
        tl.store(dg_ptr + part + tt, dg, mask=t_ok)
        dS = tl.exp(total) * dS + _mm(tl.trans(e_t[:, None] * q), do, MODE) - _mm(tl.trans(Kg), R, MODE)
    tl.store(ds0_ptr + n * K * V + s_off, dS, mask=s_mask)


class _ChunkDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, u, beta, g, S0, chunk_size):
        N, T, NH, K = k.shape
        V = u.shape[-1]
        meta, grid = _delta_setup(q, NH, V, K, T, chunk_size)
        q, k, u, beta, S0 = (x.contiguous() for x in (q, k, u, beta, S0))
        has_gate = g is not None
        g = g.contiguous() if has_gate else beta  # any pointer: never read without a gate
        o = torch.empty(N, T, V, dtype=q.dtype, device=q.device)
        S_T = torch.empty(N, K, V, dtype=S0.dtype, device=q.device)
        n_chunks = triton.cdiv(T, meta["C"])
        h = torch.empty(N, n_chunks, K, V, dtype=_wide(q.dtype), device=q.device)
        _delta_forward[grid](q, k, u, beta, g, S0, o, S_T, h, T, K, V, SAVE=True,
                             HAS_GATE=has_gate, **meta)
        ctx.save_for_backward(q, k, u, beta, g, h)
        ctx.has_gate, ctx.chunk_size, ctx.S0_dtype = has_gate, chunk_size, S0.dtype
        return o, S_T

    @staticmethod
    def backward(ctx, do, dS_T):
        q, k, u, beta, g, h = ctx.saved_tensors
        N, T, NH, K = k.shape
        V = u.shape[-1]
        meta, grid = _delta_setup(q, NH, V, K, T, ctx.chunk_size)
        dev, wide = q.device, h.dtype
        do = torch.zeros(N, T, V, dtype=q.dtype, device=dev) if do is None else do.contiguous()
        dS_T = torch.zeros(N, K, V, dtype=wide, device=dev) if dS_T is None else dS_T.contiguous()
        parts = grid[1]
        dq = torch.empty(parts, N, T, K, dtype=wide, device=dev)
        dk = torch.empty(parts, N, T, NH, K, dtype=wide, device=dev)
        dbeta = torch.empty(parts, N, T, NH, dtype=wide, device=dev)
        dg = torch.empty(parts, N, T, dtype=wide, device=dev)
        du = torch.empty(N, T, NH, V, dtype=u.dtype, device=dev)
        dS0 = torch.empty(N, K, V, dtype=wide, device=dev)
        _delta_backward[grid](q, k, u, beta, g, h, do, dS_T, dq, dk, du, dbeta, dg, dS0, T, K, V, N,
                              HAS_GATE=ctx.has_gate, **meta)
        dg = dg.sum(0).to(g.dtype) if ctx.has_gate else None
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), du, dbeta.sum(0).to(beta.dtype), dg,
                dS0.to(ctx.S0_dtype), None)


def _delta_setup(q, NH, V, K, T, chunk_size):
    """Constexprs and grid: C tokens per chunk (a power of two, at most MAX_CHUNK micro-steps
    where it can), PL micro-steps padded, value blocks of BV."""
    C = triton.next_power_of_2(max(1, min(int(chunk_size), max(1, MAX_CHUNK // NH))))  # not T's
    PL, PK, BV = triton.next_power_of_2(C * NH), triton.next_power_of_2(K), min(triton.next_power_of_2(V), 64)
    meta = dict(ACC=accumulator(q.dtype), MODE=dot_mode(q.dtype, PL, PK, BV), C=C, NH=NH, PL=PL, PK=PK,
                BV=BV)
    return meta, (q.shape[0], triton.cdiv(V, BV))


def chunk_delta_rule(q, k, u, beta, log_decay=None, S0=None, chunk_size=64):
    """Gated delta rule / DeltaProduct (as rcc.runtime.chunk.chunk_delta_rule), by Triton kernels.
    q [N, T, K]; k [N, T, n_h, K]; u [N, T, n_h, V] (= beta * v); beta [N, T, n_h]; log_decay
    [N, T] or None (no gate); S0 [N, K, V] or None (zeros). Returns (o [N, T, V], S_T [N, K, V]).
    chunk_size counts tokens, rounded to a power of two of at most 16 micro-steps."""
    N, T, NH, K = k.shape
    V = u.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    tensors = [q, k, u, beta, S0] + ([] if log_decay is None else [log_decay])
    check(tensors, "chunk_delta_rule (backend 'triton')")
    if T == 0:
        return q.new_zeros(N, 0, V), S0.clone()
    return _ChunkDelta.apply(q, k, u, beta, log_decay, S0, chunk_size)
