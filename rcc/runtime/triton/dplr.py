"""Diagonal-plus-rank-one steps chunkwise on the GPU (backend triton, plan chunk): the contract of
rcc.runtime.dplr.chunk_dplr (KDA, RWKV-7, Comba, the per-key gated DeltaProduct). Each token runs M
micro-steps S_s = diag(e^{g_s}) S_{s-1} + a_s (b_s^T S_{s-1}) + k_s u_s^T, its read-out after the
last.

The micro-steps are laid out in slots, PL = 64 a chunk (chunk_delta.slots; identity steps fill
the rest), the query in its token's last slot. With S the state entering a chunk, G the log-decays
summed from its start (Gx: through the slot before) and the reads w_s = b_s^T S_{s-1}:
    Mba, Mbk [s, r] = sum_k b_sk e^{Gx_sk - G_rk} (a, k)_rk   (r < s)
    Mqa, Mqk [t, r] = sum_k q_tk e^{G_tk - G_rk} (a, k)_rk    (r <= t)
    W = P S + R,  P = (I - Mba)^{-1} (b e^Gx),  R = (I - Mba)^{-1} Mbk U
    o = (q e^G) S + Mqa W + Mqk U,  S' = e^{G_L} S + (a e^{G_L - G})^T W + (k e^{G_L - G})^T U
The four scores with per-key decays are the GLA kernel's (`_chunk_scores`: reference rows, no
[C, C, K] tile), and so are their gradients (`_chunk_dqk`); the one sequential part, the states and
the reads W (and in reverse their gradients), is `_dplr_states`. What is dense per chunk (the
triangular solve, the [PL, PL] x [PL, K or V] products) is torch's batched linear algebra.
The log-decays' gradient: with B the global prefix sums, q is scaled by e^{B_s}, b by e^{B_(s-1)},
a and k by e^{-B_r}, so dL/dB_s = q dq + b_(s+1) db_(s+1) - a da - k dk (+ the last state's term),
and dg_s sums it from s on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import chunk_gla
from .chunk_delta import slots, state_tiles
from .chunk_gla import _dot, _nth_chunk, _state_slice, _tile, kept, launch
from .common import accumulator, check, dot_type


@triton.jit(do_not_specialize=["NC"])  # a new length or batch never recompiles
def _dplr_states(p_ptr, x_ptr, at_ptr, inc_ptr, dec_ptr, s_in_ptr, states_ptr, w_ptr, s_out_ptr,
                 NC, K, V, REVERSE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                 PL: tl.constexpr, PK: tl.constexpr, BV: tl.constexpr):
    """One program per (value block, row), every key (the reads P S need them). Forward (x = R,
    inc = K~^T U): states[c] = the state entering chunk c, w = W = P S + R, S <- e^{G_L} S + A~^T
    W + inc. REVERSE (x = Mqa^T dO, inc = (q e^G)^T dO, s_in = dS_T): states[c] = the gradient of
    the state leaving chunk c, w = dW = x + A~ dS, dS <- e^{G_L} dS + inc + P^T dW."""
    iv, n = tl.program_id(0), tl.program_id(1)
    kc, vv, ss = tl.arange(0, PK), iv * BV + tl.arange(0, BV), tl.arange(0, PL)
    kmask, vmask = kc < K, vv < V
    s_off, s_mask, S = _state_slice(s_in_ptr, n, kc, vv, K, V, ACC)
    for i in range(0, NC):
        c = _nth_chunk(i, NC, REVERSE)
        rows = (n * NC + c) * PL + ss
        tl.store(states_ptr + (n * NC + c) * K * V + s_off, S, mask=s_mask)
        P = _tile(p_ptr, rows, kc, ss < PL, kmask, K, ACC)
        A = _tile(at_ptr, rows, kc, ss < PL, kmask, K, ACC)
        x = _tile(x_ptr, rows, vv, ss < PL, vmask, V, ACC)
        inc = tl.load(inc_ptr + (n * NC + c) * K * V + s_off, mask=s_mask, other=0.0).to(ACC)
        decay = tl.load(dec_ptr + (n * NC + c) * K + kc, mask=kmask, other=0.0).to(ACC)
        if REVERSE:
            w = x + _dot(A, S, ACC, DOT)
            S = decay[:, None] * S + inc + _dot(tl.trans(P), w, ACC, DOT)
        else:
            w = x + _dot(P, S, ACC, DOT)
            S = decay[:, None] * S + inc + _dot(tl.trans(A), w, ACC, DOT)
        tl.store(w_ptr + rows[:, None] * V + vv[None, :], w, mask=vmask[None, :])
    tl.store(s_out_ptr + n * K * V + s_off, S, mask=s_mask)


def _to_slots(x, CT, PL):
    """[N, T, M, F] -> [N, NC * PL, F]: each chunk's CT tokens' micro-steps, then zeros."""
    N, T, M, F = x.shape
    NC = triton.cdiv(T, CT)
    out = x.new_zeros(N, NC, PL, F)
    padded = torch.cat([x, x.new_zeros(N, NC * CT - T, M, F)], 1) if NC * CT > T else x
    out[:, :, :CT * M] = padded.reshape(N, NC, CT * M, F)
    return out.view(N, NC * PL, F)


def _from_slots(x, T, M, CT, PL):
    N, F = x.shape[0], x.shape[-1]
    NC = x.shape[1] // PL
    return x.view(N, NC, PL, F)[:, :, :CT * M].reshape(N, NC * CT, M, F)[:, :T]


def _chunks(x, PL):
    """[N, NC * PL, F] -> [N, NC, PL, F]"""
    return x.view(x.shape[0], -1, PL, x.shape[-1])


def _solve(M, X, transpose=False):
    """(I - M)^{-1} X per chunk, or (I - M)^{-T} X; M strictly lower [.., PL, PL]."""
    if transpose:
        return torch.linalg.solve_triangular(-M.transpose(-1, -2), X, upper=True, unitriangular=True)
    return torch.linalg.solve_triangular(-M, X, upper=False, unitriangular=True)


class _Pieces:
    """The chunk form's pieces for one call: slots, decays, the four scores, P, R, the states."""

    def __init__(self, q, g, a, b, k, u, S0, chunk_size):
        N, T, M, K = a.shape
        V = u.shape[-1]
        self.N, self.T, self.M, self.K, self.V = N, T, M, K, V
        self.CT, self.PL = CT, PL = slots(M, chunk_size)
        self.NC = NC = triton.cdiv(T, CT)
        self.wide = wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        qm = q.new_zeros(N, T, M, K)
        qm[:, :, -1] = q  # the read-out after a token's last micro-step
        self.qs, self.as_, self.bs, self.ks, self.us = (_to_slots(x, CT, PL) for x in (qm, a, b, k, u))
        self.G1 = G1 = g.shape[-1]
        G, Gx = chunk_gla.decay_sums(_chunks(_to_slots(g.to(wide), CT, PL), PL))
        self.G, self.Gx = G.view(N, NC * PL, G1), Gx.reshape(N, NC * PL, G1)
        self.meta = dict(ACC=accumulator(q.dtype), DOT=dot_type(q.dtype), C=PL,
                         BK=chunk_gla.block(K, q.dtype), BV=chunk_gla.block(V, q.dtype))
        self.sizes = (N, NC * PL, K, V, G1, NC)
        self.g_sk = 0 if G1 == 1 else 1
        score = lambda x, y, strict: chunk_gla._scores(  # noqa: E731
            x, y, self.G, self.Gx if strict else self.G, self.sizes, self.meta, self.g_sk, strict)
        # (the kernel writes the blocks on and below the diagonal only)
        self.Mba, self.Mbk = (_chunks(score(self.bs, y, True), PL).tril(-1) for y in (self.as_, self.ks))
        self.Mqa, self.Mqk = (_chunks(score(self.qs, y, False), PL).tril() for y in (self.as_, self.ks))
        # dense per chunk, in the accumulator's type
        to_end = (G[:, :, -1:] - G).exp()  # e^{G_L - G}, [N, NC, PL, G1]
        self.bt = _chunks(self.bs.to(wide), PL) * Gx.exp()
        self.at, self.kt = (_chunks(x.to(wide), PL) * to_end for x in (self.as_, self.ks))
        self.uc = _chunks(self.us.to(wide), PL)
        PR = _solve(self.Mba, torch.cat([self.bt, self.Mbk @ self.uc], -1))
        self.P, self.R = PR[..., :K], PR[..., K:]
        self.decay = G[:, :, -1].exp().expand(N, NC, K).contiguous()  # e^{G_L} per key
        self.h, self.W, self.S_T = self._states(self.R, self.kt.transpose(-1, -2) @ self.uc, S0, False)

    def _states(self, x, inc, s_in, reverse):
        N, NC, K, V, PL = self.N, self.NC, self.K, self.V, self.PL
        states = torch.empty(N, NC, K, V, dtype=self.wide, device=x.device)
        w = torch.empty(N, NC, PL, V, dtype=self.wide, device=x.device)
        s_out = torch.empty(N, K, V, dtype=self.wide, device=x.device)
        meta = dict(ACC=self.meta["ACC"], DOT=self.meta["DOT"], PL=PL, **state_tiles(K))
        low = kept(self.qs.dtype)  # P and A~ as the products read them (bf16 for bf16 inputs)
        args = [self.P.to(low), x, self.at.to(low), inc, self.decay, s_in.to(self.wide)]
        _dplr_states[(triton.cdiv(V, meta["BV"]), N)](*[t.contiguous() for t in args], states, w, s_out, NC,
                                                    K, V, REVERSE=reverse, **launch(self.qs.dtype), **meta)
        return states, w, s_out

    def queries(self):
        """q e^G per chunk [N, NC, PL, K]."""
        return _chunks(self.qs.to(self.wide), self.PL) * _chunks(self.G, self.PL).exp()

    def output(self):
        """o [N, T, V] (the query slots' rows)."""
        o = self.queries() @ self.h + self.Mqa @ self.W + self.Mqk @ self.uc
        return _from_slots(o.reshape(self.N, -1, self.V), self.T, self.M, self.CT, self.PL)[:, :, -1]



def _pair(p, x, y, bq, dM, diag):
    """(dx, dy) [N, NC * PL, K] through scores M = sum_k x_k e^{bq_k - G_k} y_k: the GLA kernel's
    gradient of its scores, without its state terms."""
    N, NC, PL, K = p.N, p.NC, p.PL, p.K
    dx, dy = (torch.empty(N, NC * PL, K, dtype=p.wide, device=x.device) for _ in range(2))
    meta = p.meta
    chunk_gla._chunk_dqk[(triton.cdiv(K, meta["BK"]) * (PL // chunk_gla.SUB_ROWS), NC, N)](
        x, y, x, p.G, bq, x, x, x, dM.reshape(N, NC * PL, PL).contiguous(), dx, dy, NC * PL, K, p.V,
        p.G1, p.g_sk, SCALAR=p.G1 == 1, DIAG=int(diag), STATES=0, **launch(x.dtype), **meta)
    return dx, dy


class _ChunkDPLR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, g, a, b, k, u, S0, chunk_size):
        q, g, a, b, k, u, S0 = (x.contiguous() for x in (q, g, a, b, k, u, S0))
        p = _Pieces(q, g, a, b, k, u, S0, chunk_size)
        ctx.save_for_backward(q, g, a, b, k, u, S0)
        ctx.chunk_size = chunk_size
        return p.output().to(q.dtype), p.S_T.to(S0.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, do, dS_T):
        q, g, a, b, k, u, S0 = ctx.saved_tensors
        p = _Pieces(q, g, a, b, k, u, S0, ctx.chunk_size)  # recomputed, not kept
        N, T, M, V, PL, wide = p.N, p.T, p.M, p.V, p.PL, p.wide
        dS_T = torch.zeros_like(p.S_T) if dS_T is None else dS_T.to(wide)
        dom = torch.zeros(N, T, M, V, dtype=wide, device=q.device)
        if do is not None:
            dom[:, :, -1] = do
        dO = _chunks(_to_slots(dom, p.CT, PL), PL)
        dh, dW, dS0 = p._states(p.Mqa.transpose(-1, -2) @ dO, p.queries().transpose(-1, -2) @ dO,
                                dS_T, True)
        dP = dW @ p.h.transpose(-1, -2)
        YZ = _solve(p.Mba, torch.cat([dW, dP], -1), transpose=True)
        Y, Z = YZ[..., :V], YZ[..., V:]
        below = torch.ones(PL, PL, dtype=torch.bool, device=q.device).tril()
        strict = below.tril(-1)
        dMbk = (Y @ p.uc.transpose(-1, -2)) * strict
        dMba = (Z @ p.P.transpose(-1, -2) + Y @ p.R.transpose(-1, -2)) * strict
        dMqa = (dO @ p.W.transpose(-1, -2)) * below
        dMqk = (dO @ p.uc.transpose(-1, -2)) * below
        du = p.Mqk.transpose(-1, -2) @ dO + p.kt @ dh + p.Mbk.transpose(-1, -2) @ Y
        G = _chunks(p.G, PL)
        to_end = (G[:, :, -1:] - G).exp()
        flat = lambda x: x.reshape(N, -1, x.shape[-1])  # noqa: E731
        dq = flat((dO @ p.h.transpose(-1, -2)) * G.exp())
        da = flat((p.W @ dh.transpose(-1, -2)) * to_end)
        dk = flat((p.uc @ dh.transpose(-1, -2)) * to_end)
        db = flat(Z * _chunks(p.Gx, PL).exp())
        for x, y, bq, dM, diag, dx, dy in ((p.bs, p.as_, p.Gx, dMba, False, db, da),
                                           (p.bs, p.ks, p.Gx, dMbk, False, db, dk),
                                           (p.qs, p.as_, p.G, dMqa, True, dq, da),
                                           (p.qs, p.ks, p.G, dMqk, True, dq, dk)):
            gx, gy = _pair(p, x, y, bq, dM, diag)
            dx += gx
            dy += gy
        # dL/dB for the global prefix sums of the log-decays, per slot; dg sums it from s on
        qs, as_, bs, ks = (x.to(wide) for x in (p.qs, p.as_, p.bs, p.ks))
        dB = qs * dq - as_ * da - ks * dk
        dB[:, :-1] += (bs * db)[:, 1:]
        dB[:, -1] += (p.S_T * dS_T).sum(-1)
        dg = dB.flip(1).cumsum(1).flip(1)
        if p.G1 == 1:
            dg = dg.sum(-1, keepdim=True)
        back = lambda x: _from_slots(x, T, M, p.CT, PL)  # noqa: E731
        return (back(dq)[:, :, -1].to(q.dtype), back(dg).to(g.dtype), back(da).to(a.dtype),
                back(db).to(b.dtype), back(dk).to(k.dtype), back(flat(du)).to(u.dtype),
                dS0.to(S0.dtype), None)


def chunk_dplr(q, g, a, b, k, u, S0=None, chunk_size=64):
    """Diagonal-plus-rank-one micro-steps chunkwise (as rcc.runtime.dplr.chunk_dplr), by Triton
    kernels and torch's batched linear algebra. q [N, T, K]; g, a, b, k [N, T, M, K] (g [N, T, M,
    1]: one decay for every key); u [N, T, M, V]; S0 [N, K, V] or None (zeros). Returns (o [N, T,
    V], S_T [N, K, V]). chunk_size counts tokens (rounded so a chunk's micro-steps fit 64 slots)."""
    N, T, M, K = a.shape
    V = u.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    check([q, g, a, b, k, u, S0], "chunk_dplr (backend 'triton')")
    if T == 0:
        return q.new_zeros(N, 0, V), S0.clone()
    return _ChunkDPLR.apply(q, g, a, b, k, u, S0, chunk_size)
