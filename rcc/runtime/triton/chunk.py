"""Chunkwise gated linear attention in Triton (backend triton, plan chunk): the contract of
rcc.runtime.chunk.chunk_linear_attention, S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t,
per-key (GLA) or scalar (RetNet) log-decays g.

Forward: one program per (row, block of BV value columns): the columns of S evolve independently
(the decay scales rows), so each program keeps its [K, BV] slice of the state on chip and walks
the chunks of C steps in order. Inside a chunk, with b the log-decays summed from the chunk start:
    o_i = (q_i * e^{b_i}) S + sum_{j <= i} (sum_k q_ik k_jk e^{b_ik - b_jk}) v_j
    S'  = e^{b_C} * S + sum_j (k_j * e^{b_C - b_j}) v_j^T
Every exponent is a sum of log-decays over the steps between the two points it connects, never
e^{+b}: nothing overflows when decays are strong. The pairwise decays of a chunk are a [C, C, K]
tile (the price of that stability; C is 16 at most). The state entering each chunk is saved for the
backward kernel.

Backward: the chunks in reverse, each from its saved state, carrying dS (the gradient of the state
after the chunk): dv = A^T do + kd dS, dA = do v^T (masked), dq and dk from dA through the pairwise
decays and from the state terms, db = q dq - k dk_intra - kd dkd (+ the chunk total's terms on the
last step), dg = the reverse cumulative sum of db; dS_before = e^{b_C} dS + (q e^b)^T do. dq, dk and
dg are sums over the value blocks: each program writes its part and torch adds them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import accumulator, check, interpreted, pad

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
def _row(x, rows, i):
    # row i of the tile x (rows: its row indices), as a vector
    return tl.sum(tl.where(rows[:, None] == i, x, 0.0), 0)


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, n, t, kk, vv, T, K, V, G, g_sk, ACC: tl.constexpr):
    tm = t < T
    qk_mask = tm[:, None] & (kk < K)[None, :]
    rows = (n * T + t)[:, None]
    q = tl.load(q_ptr + rows * K + kk[None, :], mask=qk_mask, other=0.0).to(ACC)
    k = tl.load(k_ptr + rows * K + kk[None, :], mask=qk_mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + rows * V + vv[None, :], mask=tm[:, None] & (vv < V)[None, :], other=0.0).to(ACC)
    # padded steps have log-decay 0: they leave the state as it is
    g = tl.load(g_ptr + rows * G + kk[None, :] * g_sk, mask=qk_mask, other=0.0).to(ACC)
    return q, k, v, g


@triton.jit
def _pairwise_decay(b, cc):
    # [C, C, K]: e^{b_ik - b_jk} for j <= i, else 0
    causal = cc[:, None] >= cc[None, :]
    return tl.exp(tl.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf")))


@triton.jit
def _gla_forward(q_ptr, k_ptr, v_ptr, g_ptr, s0_ptr, o_ptr, sT_ptr, h_ptr, T, K, V, G, g_sk,
                 SAVE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr, C: tl.constexpr,
                 PK: tl.constexpr, BV: tl.constexpr):
    n, iv = tl.program_id(0), tl.program_id(1)
    kk, cc = tl.arange(0, PK), tl.arange(0, C)
    vv = iv * BV + tl.arange(0, BV)
    s_mask = (kk < K)[:, None] & (vv < V)[None, :]
    s_off = kk[:, None] * V + vv[None, :]
    S = tl.load(s0_ptr + n * K * V + s_off, mask=s_mask, other=0.0).to(ACC)
    n_chunks = tl.cdiv(T, C)
    for c in range(0, n_chunks):
        t = c * C + cc
        q, k, v, g = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, n, t, kk, vv, T, K, V, G, g_sk, ACC)
        if SAVE:  # the state entering the chunk
            tl.store(h_ptr + (n * n_chunks + c) * K * V + s_off, S, mask=s_mask)
        b = tl.cumsum(g, 0)
        A = tl.sum(q[:, None, :] * k[None, :, :] * _pairwise_decay(b, cc), 2)
        o = _mm(q * tl.exp(b), S, MODE) + _mm(A, v, MODE)
        tl.store(o_ptr + (n * T + t)[:, None] * V + vv[None, :], o,
                 mask=(t < T)[:, None] & (vv < V)[None, :])
        b_end = _row(b, cc, C - 1)
        kd = k * tl.exp(b_end[None, :] - b)
        S = tl.exp(b_end)[:, None] * S + _mm(tl.trans(kd), v, MODE)
    tl.store(sT_ptr + n * K * V + s_off, S, mask=s_mask)


@triton.jit
def _gla_backward(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, do_ptr, dsT_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
                  ds0_ptr, T, K, V, G, g_sk, N,
                  ACC: tl.constexpr, MODE: tl.constexpr, C: tl.constexpr, PK: tl.constexpr,
                  BV: tl.constexpr):
    n, iv = tl.program_id(0), tl.program_id(1)
    kk, cc = tl.arange(0, PK), tl.arange(0, C)
    vv = iv * BV + tl.arange(0, BV)
    s_mask = (kk < K)[:, None] & (vv < V)[None, :]
    s_off = kk[:, None] * V + vv[None, :]
    dS = tl.load(dsT_ptr + n * K * V + s_off, mask=s_mask, other=0.0).to(ACC)
    n_chunks = tl.cdiv(T, C)
    causal = cc[:, None] >= cc[None, :]
    for cr in range(0, n_chunks):
        c = n_chunks - 1 - cr
        t = c * C + cc
        tm = t < T
        q, k, v, g = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, n, t, kk, vv, T, K, V, G, g_sk, ACC)
        do = tl.load(do_ptr + (n * T + t)[:, None] * V + vv[None, :],
                     mask=tm[:, None] & (vv < V)[None, :], other=0.0).to(ACC)
        S = tl.load(h_ptr + (n * n_chunks + c) * K * V + s_off, mask=s_mask, other=0.0).to(ACC)
        b = tl.cumsum(g, 0)
        eb = tl.exp(b)
        decay = _pairwise_decay(b, cc)
        A = tl.sum(q[:, None, :] * k[None, :, :] * decay, 2)
        b_end = _row(b, cc, C - 1)
        to_end = tl.exp(b_end[None, :] - b)
        kd = k * to_end
        dv = _mm(tl.trans(A), do, MODE) + _mm(kd, dS, MODE)
        tl.store(dv_ptr + (n * T + t)[:, None] * V + vv[None, :], dv,
                 mask=tm[:, None] & (vv < V)[None, :])
        dA = tl.where(causal, _mm(do, tl.trans(v), MODE), 0.0)
        P = dA[:, :, None] * decay
        dq = tl.sum(P * k[None, :, :], 1) + eb * _mm(do, tl.trans(S), MODE)
        dk_intra = tl.sum(P * q[:, None, :], 0)
        dkd = _mm(v, tl.trans(dS), MODE)
        dk = dk_intra + to_end * dkd
        db = q * dq - k * dk_intra - kd * dkd
        db_end = tl.sum(kd * dkd, 0) + tl.exp(b_end) * tl.sum(dS * S, 1)
        db += tl.where(cc[:, None] == C - 1, db_end[None, :], 0.0)
        dg = tl.sum(db, 0)[None, :] - tl.cumsum(db, 0) + db  # sum over the steps from t on
        part = ((iv * N + n) * T + t)[:, None] * K + kk[None, :]
        qk_mask = tm[:, None] & (kk < K)[None, :]
        tl.store(dq_ptr + part, dq, mask=qk_mask)
        tl.store(dk_ptr + part, dk, mask=qk_mask)
        tl.store(dg_ptr + part, dg, mask=qk_mask)
        dS = tl.exp(b_end)[:, None] * dS + _mm(tl.trans(q * eb), do, MODE)
    tl.store(ds0_ptr + n * K * V + s_off, dS, mask=s_mask)


def _setup(q, v, chunk_size):
    N, T, K = q.shape
    V = v.shape[-1]
    C = pad(max(1, min(int(chunk_size), T, MAX_CHUNK)))
    PK, BV = pad(K), min(pad(V), 64)
    dtype = q.dtype
    if interpreted() or dtype == torch.float64 or min(C, PK, BV) < 16:
        mode = 0
    else:
        mode = 2 if dtype in (torch.bfloat16, torch.float16) else 1
    return N, T, K, V, dict(ACC=accumulator(dtype), MODE=mode, C=C, PK=PK, BV=BV), (N, triton.cdiv(V, BV))


class _ChunkGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, S0, chunk_size):
        N, T, K, V, meta, grid = _setup(q, v, chunk_size)
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        S0 = S0.contiguous()
        G = g.shape[-1]
        o = torch.empty(N, T, V, dtype=q.dtype, device=q.device)
        S_T = torch.empty(N, K, V, dtype=S0.dtype, device=q.device)
        n_chunks = triton.cdiv(T, meta["C"])
        h = torch.empty(N, n_chunks, K, V, dtype=torch.float64 if q.dtype == torch.float64
                        else torch.float32, device=q.device)
        _gla_forward[grid](q, k, v, g, S0, o, S_T, h, T, K, V, G, 0 if G == 1 else 1,
                           SAVE=True, **meta)
        ctx.save_for_backward(q, k, v, g, h)
        ctx.chunk_size, ctx.S0_dtype = chunk_size, S0.dtype
        return o, S_T

    @staticmethod
    def backward(ctx, do, dS_T):
        q, k, v, g, h = ctx.saved_tensors
        N, T, K, V, meta, grid = _setup(q, v, ctx.chunk_size)
        G = g.shape[-1]
        do = torch.zeros(N, T, V, dtype=q.dtype, device=q.device) if do is None else do.contiguous()
        dS_T = (torch.zeros(N, K, V, dtype=h.dtype, device=q.device) if dS_T is None
                else dS_T.contiguous())
        parts = grid[1]
        dq, dk, dg = (torch.empty(parts, N, T, K, dtype=h.dtype, device=q.device) for _ in range(3))
        dv = torch.empty(N, T, V, dtype=v.dtype, device=q.device)
        dS0 = torch.empty(N, K, V, dtype=h.dtype, device=q.device)
        _gla_backward[grid](q, k, v, g, h, do, dS_T, dq, dk, dv, dg, dS0, T, K, V, G,
                            0 if G == 1 else 1, N, **meta)
        dg = dg.sum(0)
        if G == 1:
            dg = dg.sum(-1, keepdim=True)
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dg.to(g.dtype),
                dS0.to(ctx.S0_dtype), None)


def chunk_linear_attention(q, k, v, log_decay, S0=None, chunk_size=64):
    """Gated linear attention (as rcc.runtime.chunk.chunk_linear_attention), by Triton kernels.
    q, k [N, T, K]; v [N, T, V]; log_decay [N, T, K] (per key) or [N, T, 1] (scalar); S0
    [N, K, V] or None (zeros). Returns (o [N, T, V], S_T [N, K, V]). chunk_size is rounded to a
    power of two of at most 16 steps."""
    N, T, K = q.shape
    V = v.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    check([q, k, v, log_decay, S0], "chunk_linear_attention (backend 'triton')")
    if T == 0:
        return q.new_zeros(N, 0, V), S0.clone()
    return _ChunkGLA.apply(q, k, v, log_decay, S0, chunk_size)
