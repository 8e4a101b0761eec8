"""The max-plus scan: m_t = max(m_{t-1} + a_t, b_t) for every step at once (xLSTM's mLSTM
stabiliser m is one; given m, the mLSTM's C and n are affine and plan chunk runs them).

Unrolled from the state m entering a stretch of steps, with A_t the sum of a over the stretch
through t:  m_t = A_t + max(m, max_{s<=t} (b_s - A_s)),  a cumsum and a cummax. Chunks of
`chunk` steps keep every A a sum of few terms (a long prefix sum of log-forget gates would cost
the float precision of m); a loop over chunks composes each chunk's map m -> max(m + A_C, B_C).
Differentiable (cumsum, cummax and maximum are torch ops).
"""
from __future__ import annotations

import torch


def maxplus_scan(a: torch.Tensor, b: torch.Tensor, m0: torch.Tensor, chunk: int = 64):
    """a, b: [T, N, *shape] (a broadcasts to b); m0: [N, *shape]. Returns m [T, N, *shape]."""
    a = a.expand_as(b)
    T = b.shape[0]
    C = max(1, min(chunk, T))
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    if pad:  # steps that keep m: a = 0, b = -inf
        a = torch.cat([a, a.new_zeros((pad, *a.shape[1:]))])
        b = torch.cat([b, b.new_full((pad, *b.shape[1:]), float("-inf"))])
    a = a.reshape(n_chunks, C, *a.shape[1:])
    b = b.reshape(n_chunks, C, *b.shape[1:])
    A = a.cumsum(1)
    best = (b - A).cummax(1).values  # max over s <= t of b_s - A_s, within the chunk
    starts, m = [], m0.expand(b.shape[2:])
    for c in range(n_chunks):
        starts.append(m)
        m = A[c, -1] + torch.maximum(m, best[c, -1])
    out = A + torch.maximum(torch.stack(starts).unsqueeze(1), best)
    return out.reshape(n_chunks * C, *out.shape[2:])[:T]
