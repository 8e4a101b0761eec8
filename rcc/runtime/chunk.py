"""Chunkwise-parallel forms of matrix-state recurrences in plain torch (autograd-differentiable), batch-major
[N, T, ...]: gated linear attention (`chunk_linear_attention`) and the gated delta rule / DeltaProduct
(`chunk_delta_rule`). The state S is [N, K, V], rows indexed by keys; both read out o_t = S_t^T q_t."""
from __future__ import annotations

import math

import torch

__all__ = ["chunk_linear_attention", "chunk_delta_rule"]

# Numerical stability (both algorithms).
#   Every decay factor used is exp(sum of log-decays over a contiguous segment of steps that lies between
#   the two points it connects), so its exponent is <= 0 whenever the log-decays are <= 0: nothing is ever
#   exp(+cumsum) or divided by a decay, so there is no overflow, and decays that underflow to 0 stand for
#   contributions that truly are below the float range. The naive factorisation q_i e^{b_i} . k_j e^{-b_j}
#   (b = prefix sum) is never formed. Each segment sum is also summed directly over its own segment (a
#   masked cumsum, `_segment_sums`, or a prefix / suffix sum from a chunk edge), never as the difference
#   of two long prefix sums, so one log-decay of -1e4 does not cost the segments after it their float32
#   precision (b_i - b_j with |b| ~ 1e4 would keep only ~3 significant digits of a small difference).
#   Positions masked off (j > i) are set to -inf before exp, so they are exactly 0 with zero gradient.


def _segment_sums(x):
    """x [..., C] -> [..., C, C]: out[..., i, j] = sum of x[..., p] for j < p <= i (0 on the diagonal),
    -inf for j > i. Each entry is its own masked cumsum, not a difference of prefix sums."""
    size = x.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=x.device)
    # terms[..., p, j] = x_p where p > j: summing over p <= i gives the segment (j, i].
    terms = torch.where(ones.tril(-1), x.unsqueeze(-1), x.new_zeros(()))
    return terms.cumsum(-2).masked_fill(~ones.tril(), float("-inf"))


def _suffix_sums_after(x, dim):
    """out[i] = sum of x[p] for p > i along `dim` (0 at the last position), summed without cancellation."""
    shifted = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim)
    return shifted.flip(dim).cumsum(dim).flip(dim)


def _chunking(T, chunk_size):
    """(steps per chunk, number of chunks, steps of padding after the last step)."""
    chunk = max(1, min(int(chunk_size), T))
    n_chunks = -(-T // chunk)
    return chunk, n_chunks, n_chunks * chunk - T


def _pad_time(x, pad):
    """Zero-pad dim 1 (time) by `pad` steps at the end."""
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], pad) + tuple(x.shape[2:]))], 1)


def _sub_chunk_size(chunk):
    """The largest divisor d of `chunk` with d*d <= chunk (8 for 64): balances the [d, d, K] pairwise
    decays of the diagonal blocks against the [chunk/d, chunk/d, K] decays between sub-chunks."""
    return max(d for d in range(1, math.isqrt(chunk) + 1) if chunk % d == 0)


def _pass_states(S0, transition, added, elementwise):
    """S_{c+1} = transition_c (*|@) S_c + added_c over chunks; returns the state entering each chunk
    [N, n_chunks, K, V] and the final state. A Python loop over T/chunk steps, each one tensor op."""
    states = []
    S = S0
    for c in range(added.shape[1]):
        states.append(S)
        S = (transition[:, c] * S if elementwise else transition[:, c] @ S) + added[:, c]
    return torch.stack(states, 1), S


# Summary of algorithm (chunk_linear_attention).
#   Recurrence: S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, a_t = exp(log_decay_t) per key (GLA)
#   or one scalar per step. Cut time into chunks of C steps (the tail padded with k = v = q = 0 and
#   log-decay 0, which leave the state unchanged). Inside a chunk, with S the state entering it:
#     o_i = (q_i * exp(cum_i)) S  +  sum_{j<=i} (q_i * exp(seg(j, i]) . k_j) v_j        [inter + intra]
#     S'  = exp(total) * S  +  sum_j (k_j * exp(seg(j, C])) v_j^T
#   where cum_i = log-decays from the chunk start through i, seg(j, i] = those of steps j+1..i.
#   1. For all chunks at once: the intra-chunk attention A[i, j] (masked j <= i) and o_intra = A v, and
#      each chunk's state increment and total decay.
#   2. A Python loop over chunks passes the state: S_{c+1} = exp(total_c) * S_c + increment_c.
#   3. For all chunks at once: o = o_intra + (q * exp(cum)) S_c.
#   Intra-chunk A: scalar decay -> (q k^T) * exp(segment sums [C, C]), one matmul.
#   Per-key decay -> the decay sits inside the dot product over keys; a pairwise [C, C, K] tensor for the
#   whole chunk would cost C*C*K memory per chunk, so the chunk is split into sub-chunks of d steps
#   (d ~ sqrt(C)): blocks on the diagonal use the pairwise [d, d, K] decays; a block (query sub-chunk n,
#   key sub-chunk m < n) factors through the two sub-chunk edges between them:
#     A[i, j] = sum_k q_ik exp(seg(start_n, i]_k) * exp(seg(end_m, start_n]_k) * exp(seg(j, end_m]_k) k_jk,
#   three factors that all have exponents <= 0, contracted by one einsum.
def chunk_linear_attention(q, k, v, log_decay, S0=None, chunk_size=64, prev=False):
    """Gated linear attention. q, k [N, T, K]; v [N, T, V]; log_decay [N, T, K] (per key) or [N, T, 1]
    (scalar); S0 [N, K, V] or None (zeros). Returns (o [N, T, V], S_T [N, K, V]). chunk_size counts steps.
    prev: o_t reads the state before step t (o_t = S_{t-1}^T q_t, RWKV-6's form) instead of after it."""
    N, T, K = q.shape
    V = v.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    chunk, n_chunks, pad = _chunking(T, chunk_size)
    qc, kc, vc, g = (_pad_time(x, pad).reshape(N, n_chunks, chunk, x.shape[-1])
                     for x in (q, k, v, log_decay))
    scalar = g.shape[-1] == 1

    if prev:  # strict: key j < i, decays over j < p <= i - 1
        o_intra = decayed_scores(qc, kc, g.expand(qc.shape), strict=True) @ vc
    elif scalar:
        decay = _segment_sums(g[..., 0]).exp()  # [N, n_chunks, C, C]
        o_intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
    else:
        o_intra = _intra_chunk_scores(qc, kc, g) @ vc

    total = g.sum(2)  # [N, n_chunks, K or 1]
    increments = (kc * _suffix_sums_after(g, 2).exp()).transpose(-1, -2) @ vc  # [N, n_chunks, K, V]
    starts, S_T = _pass_states(S0, total.exp().unsqueeze(-1), increments, elementwise=True)
    from_start = g.cumsum(2)
    if prev:  # through step i - 1
        from_start = torch.cat([torch.zeros_like(g[:, :, :1]), from_start[:, :, :-1]], 2)
    o = (qc * from_start.exp()) @ starts + o_intra
    return o.reshape(N, n_chunks * chunk, V)[:, :T], S_T


def _intra_chunk_scores(qc, kc, g):
    """The intra-chunk attention [N, n_chunks, C, C] (j <= i, 0 above the diagonal) for per-key
    decays g [N, n_chunks, C, K] (see the summary above)."""
    N, n_chunks, chunk, K = qc.shape
    sub = _sub_chunk_size(chunk)
    n_sub = chunk // sub
    qs, ks, gs = (x.reshape(N, n_chunks, n_sub, sub, K) for x in (qc, kc, g))

    # Diagonal blocks: pairwise decays [.., n_sub, sub(i), sub(j), K].
    pair_decay = _segment_sums(gs.transpose(-1, -2)).exp().permute(0, 1, 2, 4, 5, 3)
    a_diag = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * pair_decay).sum(-1)  # [.., n_sub, i, j]

    # Off-diagonal blocks, factored through the sub-chunk edges.
    q_from_start = qs * gs.cumsum(-2).exp()
    k_to_end = ks * _suffix_sums_after(gs, -2).exp()
    sub_totals = _segment_sums(gs.sum(-2).transpose(-1, -2))  # [.., K, n, m]: sub-chunks m < p <= n
    # Decay between the end of sub-chunk m and the start of n = sub-chunks m < p <= n-1 (row n-1);
    # row 0 and m >= n are -inf (no earlier sub-chunk).
    between = torch.cat([torch.full_like(sub_totals[..., :1, :], float("-inf")), sub_totals[..., :-1, :]],
                        -2).exp().permute(0, 1, 3, 4, 2)  # [.., n, m, K]
    a_off = torch.einsum("...nik,...nmk,...mjk->...nimj", q_from_start, between, k_to_end)

    block_diag = torch.eye(n_sub, dtype=qc.dtype, device=qc.device)[:, None, :, None]
    attn = a_off + a_diag.unsqueeze(-2) * block_diag  # [.., n, i, m, j]
    return attn.reshape(N, n_chunks, chunk, chunk)


def decayed_scores(x, y, g, strict):
    """out[..., i, j] = sum_k x_ik y_jk exp(sum of g_pk over j < p <= i), for j <= i (strict:
    over j < p <= i - 1, for j < i); 0 elsewhere. x, y, g: [..., L, K]."""
    if not strict:
        if g.shape[-1] == 1:  # one decay for every key: a matmul times the [L, L] decays
            return (x @ y.transpose(-1, -2)) * _segment_sums(g[..., 0]).exp()
        return _intra_chunk_scores(x, y, g)
    # row i of the strict form is row i - 1 of the inclusive one for the queries moved back a step
    ahead = torch.cat([x[..., 1:, :], torch.zeros_like(x[..., :1, :])], -2)
    scores = decayed_scores(ahead, y, g, strict=False)
    return torch.cat([torch.zeros_like(scores[..., :1, :]), scores[..., :-1, :]], -2)


# Summary of algorithm (chunk_delta_rule).
#   Flatten each token into its n_h micro-steps s (gate log-decay on the first, readout after the last):
#     S_s = a_s S_{s-1} + k_s delta_s^T,  delta_s = u_s - beta_s (a_s S_{s-1})^T k_s.
#   Chunks hold `chunk_size` whole tokens (L = chunk_size * n_h micro-steps), so a token's micro-steps are
#   never split; the tail is padded with k = u = q = 0, beta = 0, log-decay 0 (identity steps).
#   With S the state entering a chunk and gam_s = log-gates from the chunk start through s, unrolling gives
#     a_s S_{s-1} = e^{gam_s} S + sum_{r<s} e^{seg(r, s]} k_r delta_r^T, so the unit-lower-triangular system
#     (I + A) Delta = U - diag(beta e^{gam}) K S,   A[s, r] = beta_s e^{seg(r, s]} k_s.k_r  (r < s).
#   The UT transform solves it once per chunk for both right-hand sides (one triangular solve of size L):
#     U~ = (I + A)^{-1} U,  W = (I + A)^{-1} diag(beta e^{gam}) K,  so Delta = U~ - W S  (the WY form).
#   Then, with Aqk[t, r] = e^{seg(r, t]} q_t.k_r for micro-steps r of tokens <= t:
#     o = e^{gam} q S + Aqk Delta = (e^{gam} q - Aqk W) S + Aqk U~
#     S' = e^{gam_L} S + Kd^T Delta = (e^{gam_L} I - Kd^T W) S + Kd^T U~,  Kd_r = k_r e^{seg(r, L]}.
#   1. For all chunks at once: A, the solve, the [K, K] chunk transition, the [K, V] increment, and the
#      query and output terms above.
#   2. A Python loop over chunks: S_{c+1} = transition_c @ S_c + increment_c (one K x K x V matmul each).
#   3. For all chunks at once: o = q_eff S_c + Aqk U~.
#   Gates are per token, so all segment sums are taken over tokens ([C, C]) and indexed out to micro-steps.
def chunk_delta_rule(q, k, u, beta, log_decay=None, S0=None, chunk_size=64):
    """Gated delta rule / DeltaProduct. q [N, T, K]; k [N, T, n_h, K]; u [N, T, n_h, V] (= beta * v);
    beta [N, T, n_h]; log_decay [N, T] or None (no gate); S0 [N, K, V] or None (zeros).
    Returns (o [N, T, V], S_T [N, K, V]). chunk_size counts tokens (chunk_size * n_h micro-steps)."""
    N, T, n_h, K = k.shape
    V = u.shape[-1]
    if S0 is None:
        S0 = q.new_zeros(N, K, V)
    chunk, n_chunks, pad = _chunking(T, chunk_size)
    micro = chunk * n_h
    qc = _pad_time(q, pad).reshape(N, n_chunks, chunk, K)
    kc = _pad_time(k, pad).reshape(N, n_chunks, micro, K)
    uc = _pad_time(u, pad).reshape(N, n_chunks, micro, V)
    bc = _pad_time(beta, pad).reshape(N, n_chunks, micro)

    device = q.device
    token_of = torch.arange(micro, device=device) // n_h  # token (within the chunk) of each micro-step
    earlier_micro = torch.ones(micro, micro, dtype=torch.bool, device=device).tril(-1)  # r < s
    kk = kc @ kc.transpose(-1, -2)  # [N, n_chunks, L, L]
    qk = qc @ kc.transpose(-1, -2)  # [N, n_chunks, C, L]
    if log_decay is None:
        zero = kk.new_zeros(())
        A = torch.where(earlier_micro, bc.unsqueeze(-1) * kk, zero)
        Aqk = torch.where(token_of <= torch.arange(chunk, device=device)[:, None], qk, zero)
        w_rhs = bc.unsqueeze(-1) * kc
        k_to_end, q_gated = kc, qc
        chunk_gate = q.new_ones(N, n_chunks)
    else:
        g = _pad_time(log_decay, pad).reshape(N, n_chunks, chunk)
        seg = _segment_sums(g)  # [N, n_chunks, C(t), C(t')]: tokens t' < p <= t
        micro_seg = seg[..., token_of[:, None], token_of[None, :]].masked_fill(~earlier_micro, float("-inf"))
        A = bc.unsqueeze(-1) * kk * micro_seg.exp()
        Aqk = qk * seg[..., token_of].exp()
        gate_from_start = g.cumsum(-1).exp()  # [N, n_chunks, C]
        w_rhs = (bc * gate_from_start[..., token_of]).unsqueeze(-1) * kc
        k_to_end = kc * _suffix_sums_after(g, -1)[..., token_of].exp().unsqueeze(-1)
        q_gated = qc * gate_from_start.unsqueeze(-1)
        chunk_gate = g.sum(-1).exp()

    # UT transform: unitriangular=True reads only the strictly lower part of A (its diagonal is 0).
    solved = torch.linalg.solve_triangular(A, torch.cat([uc, w_rhs], -1), upper=False, unitriangular=True)
    u_tilde, W = solved.split([V, K], -1)
    k_to_end_t = k_to_end.transpose(-1, -2)
    eye = torch.eye(K, dtype=q.dtype, device=device)
    transition = chunk_gate[..., None, None] * eye - k_to_end_t @ W  # [N, n_chunks, K, K]
    increments = k_to_end_t @ u_tilde  # [N, n_chunks, K, V]
    starts, S_T = _pass_states(S0, transition, increments, elementwise=False)
    o = (q_gated - Aqk @ W) @ starts + Aqk @ u_tilde
    return o.reshape(N, n_chunks * chunk, V)[:, :T], S_T
