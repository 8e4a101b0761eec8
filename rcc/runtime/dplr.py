"""The chunkwise form of diagonal-plus-rank-one transitions, in plain torch (differentiable).

Each token runs M micro-steps s (its readout after the last):
    S_s = diag(exp(g_s)) S_{s-1} + a_s (b_s^T S_{s-1}) + k_s u_s^T
(the read b_s^T S_{s-1} is of the state entering the micro-step). KDA and the per-key gated
delta rule are one micro-step (a = -beta k, b = exp(g) * k, write k, beta v), RWKV-7 and Comba one
micro-step with their own removal and write keys, DeltaProduct n_h of them.

Summary of algorithm (chunk_dplr). Cut the micro-steps into chunks of L; with S the state entering a
chunk, G_s the log-decays summed from the chunk start through s (per key) and w_s = b_s^T S_{s-1}:
    S_s = e^{G_s} S + sum_{r<=s} e^{G_s - G_r} (a_r w_r^T + k_r u_r^T)
    w_s = (b_s e^{G_{s-1}})^T S + sum_{r<s} [b_s . e^{G_{s-1} - G_r} a_r] w_r + [b_s . e^{..} k_r] u_r
so the reads solve one unit-lower-triangular system per chunk, for two right-hand sides:
    (I - Mba) W = B S + Mbk U   ->   W = P S + R,  P = (I - Mba)^-1 B,  R = (I - Mba)^-1 Mbk U
and, with Mqa, Mqk the decayed products of the queries with a and k (r <= t):
    o_t = (q_t e^{G_t} + Mqa P) S + Mqa R + Mqk U
    S_L = (diag(e^{G_L}) + A~^T P) S + A~^T R + K~^T U,   A~_r = a_r e^{G_L - G_r} (K~ likewise)
All chunks at once, then a loop over chunks passes the state (S_{c+1} = transition_c @ S_c +
increment_c), then the outputs for all chunks at once. Every decay is exp of a sum of log-decays
over a segment between the two points it connects (rcc.runtime.chunk's stability argument): the
products over keys go through `decayed_scores`, never through e^{+G}.
"""
from __future__ import annotations

import torch

from .chunk import _chunking, _pad_time, _pass_states, _suffix_sums_after, decayed_scores

__all__ = ["chunk_dplr"]


def chunk_dplr(q, g, a, b, k, u, S0=None, chunk_size=64):
    """q [N, T, K]; g, a, b, k [N, T, M, K] (g: log-decays, [N, T, M, 1] for one decay for every
    key); u [N, T, M, V]; S0 [N, K, V] or None (zeros). Returns (o [N, T, V], S_T [N, K, V]).
    chunk_size counts tokens (chunk_size * M micro-steps)."""
    N, T, M, K = a.shape
    V = u.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    chunk, n_chunks, pad = _chunking(T, chunk_size)
    L = chunk * M
    G1 = g.shape[-1]  # 1: one decay for every key (Comba): cheaper decayed products
    q = q.unsqueeze(2).expand(N, T, M, K)  # the token's query at each of its micro-steps
    qc, ac, bc, kc = (_pad_time(x, pad).reshape(N, n_chunks, L, K) for x in (q, a, b, k))
    gc = _pad_time(g.expand(N, T, M, G1), pad).reshape(N, n_chunks, L, G1)
    uc = _pad_time(u, pad).reshape(N, n_chunks, L, V)

    G = gc.cumsum(-2)  # through s
    G_before = G - gc  # through s - 1 (0 at the chunk start)
    to_end = _suffix_sums_after(gc, -2).exp()  # e^{G_L - G_r}
    Mba = decayed_scores(bc, ac, gc, strict=True)
    Mbk = decayed_scores(bc, kc, gc, strict=True)
    Mqa = decayed_scores(qc, ac, gc, strict=False)
    Mqk = decayed_scores(qc, kc, gc, strict=False)

    # unitriangular=True reads the strictly lower part only: the system is (I - Mba)
    solved = torch.linalg.solve_triangular(-Mba, torch.cat([bc * G_before.exp(), Mbk @ uc], -1),
                                           upper=False, unitriangular=True)
    P, R = solved.split([K, V], -1)
    a_end, k_end = (ac * to_end).transpose(-1, -2), (kc * to_end).transpose(-1, -2)
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    transition = G[..., -1, :].exp().unsqueeze(-1) * eye + a_end @ P  # [N, n_chunks, K, K]
    increments = a_end @ R + k_end @ uc  # [N, n_chunks, K, V]
    starts, S_T = _pass_states(S0, transition, increments, elementwise=False)

    last = torch.arange(M - 1, L, M, device=q.device)  # each token's last micro-step
    Mqa, Mqk = Mqa[..., last, :], Mqk[..., last, :]
    o = (qc[..., last, :] * G[..., last, :].exp() + Mqa @ P) @ starts + Mqa @ R + Mqk @ uc
    return o.reshape(N, n_chunks * chunk, V)[:, :T], S_T
