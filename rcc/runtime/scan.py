"""Parallel (log-depth) scans for linear recurrences, time-major: `linear_scan` (s_t = a_t*s_{t-1} + b_t)
and `block_scan` (s_t = A_t @ s_{t-1} + b_t with small k-by-k blocks), each with an O(T)-memory backward.
"""
from __future__ import annotations

import torch

__all__ = ["linear_scan", "block_scan", "linear_adjoint", "block_adjoint"]

# Summary of algorithm (both scans; the JAX lax.associative_scan odd/even recursion, Blelloch-style).
#   An affine step is the pair e_t = (A_t, b_t) acting as s -> A_t s + b_t. Composing "first e1, then e2"
#   is associative:  e2 . e1 = (A2 A1, A2 b1 + b2).  Fold s0 into the first element (b_0 += A_0 s0);
#   then the inclusive prefix compositions' b parts ARE the states.
#   recurse(e[0..T)):
#     1. combine neighbours (e_1.e_0, e_3.e_2, ...)       -> T//2 elements, one elementwise pass
#     2. recurse on them                                   -> prefixes at the odd positions 1, 3, 5, ...
#     3. prefix at even position 2i = e_{2i} . prefix_{2i-1} -> one more elementwise pass
#   Depth 2*log2(T) elementwise ops, total work O(T) (about 2 combines per element).
#   Only the b part of a prefix is ever needed, so the A products are formed only in step 1, and when
#   the decay is constant in time (A given with a time extent of 1) they stay [1, ...] at every level:
#   a broadcast decay is never expanded over time or over the state.
#
# Why this scheme (float32 forward, best of 3, on the 2-core dev CPU shared with other jobs, so +-2x noise;
# M = N*d elements per step):
#                          T=1k M=8k   T=16k M=1k   T=16k M=8k   T=64k M=1k
#   odd/even (this)          38 ms        88 ms       1.4 s        1.3 s
#   Hillis-Steele doubling  144 ms       1.1 s        12 s         9.6 s
#   two-level (chunks of 64, doubling inside, carries across chunks)
#                            99 ms       450 ms       5.1 s        1.9 s
#   python loop (not log-depth, for scale)
#                            17 ms       250 ms       0.7 s        1.4 s
#   Hillis-Steele does log2(T) full passes (O(T log T) work) and must expand the decay over time; the
#   two-level scheme still does log2(chunk) passes; on a CPU there is no idle parallel hardware to
#   hide that extra work, so the work-efficient recursion wins everywhere measured. (With a large M the
#   memory-bound loop's single pass is hard to beat on CPU; the scan pays off for small M and on GPUs.)
#
# Numerics: only products and sums of the inputs, never a division or an exp of a cumulative log, so
# decays near 0 underflow harmlessly to 0 and decays near 1 stay exact to rounding; the summation
# tree has depth log2(T), so rounding error grows like log T rather than T.
#
# Backward (custom autograd.Function, O(T) memory: saves a, s0 and the states, no recursion tree):
#   lam_t = g_t + A_{t+1}^T lam_{t+1}  (one reversed scan of the same kind, with transposed blocks),
#   grad_b = lam, grad_A_t = lam_t s_{t-1}^T (outer product; elementwise for linear_scan),
#   grad_s0 = A_0^T lam_0, each summed down to the input's (possibly broadcast) shape.


def _scan_core(A, B, combine_a, combine_b):
    """Inclusive scan of the affine pairs (A_t, B_t) along dim 0, in place in B; returns B.

    A has a time extent of T or 1 (constant in time). B must be a tensor we own (it is overwritten).
    combine_a(a_later, a_earlier) and combine_b(a_later, b_earlier, b_later) compose two steps.
    """
    T = B.shape[0]
    if T == 1:
        return B
    constant = A.shape[0] == 1

    def take(x, sl):
        return x if constant else x[sl]

    # 1. neighbours (0,1), (2,3), ...: the later element is the odd one.
    a_odd = take(A, slice(1, None, 2))
    a_red = combine_a(a_odd, take(A, slice(0, T - 1, 2)))
    b_red = combine_b(a_odd, B[0:T - 1:2], B[1::2])
    # 2. prefixes at the odd positions.
    b_odd = _scan_core(a_red, b_red, combine_a, combine_b)
    # 3. prefixes at the even positions 2, 4, ...: combine the odd prefix just before with the element.
    n_even = (T - 1) // 2
    if n_even:
        B[2::2] = combine_b(take(A, slice(2, None, 2)), b_odd[:n_even], B[2::2])
    B[1::2] = b_odd
    return B


def _sum_to(x, shape):
    """Sum a broadcast result back down to `shape` (the shape of the input it was broadcast from)."""
    if tuple(x.shape) == tuple(shape):
        return x
    lead = x.dim() - len(shape)
    if lead:
        x = x.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if dims:
        x = x.sum(dim=dims, keepdim=True)
    return x


def _promoted_dtype(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point and not dtype.is_complex:
        dtype = torch.get_default_dtype()
    return dtype


def _time_leading(x, ndim):
    """View x with exactly `ndim` dims (right-aligned broadcasting), so dim 0 is time (extent T or 1)."""
    return x.reshape((1,) * (ndim - x.dim()) + tuple(x.shape))


# ---- linear (elementwise) scan -------------------------------------------------------------------

def _lin_a(a_later, a_earlier):
    return a_later * a_earlier


def _lin_b(a_later, b_earlier, b_later):
    return torch.addcmul(b_later, a_later, b_earlier)


def _broadcast_shape(*shapes):
    """NumPy broadcasting of shapes (torch.broadcast_shapes imports sympy, which generated
    modules must not load)."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        sizes = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast together")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _linear_forward(a, b, s0):
    """States of s_t = a_t*s_{t-1} + b_t; a has b's ndim (time extent T or 1), s0 broadcasts to b[0]."""
    shape = _broadcast_shape(a.shape, b.shape, (1,) + tuple(s0.shape))
    B = torch.empty(shape, dtype=_promoted_dtype(a, b, s0), device=b.device)
    B[1:] = b[1:]
    B[0] = torch.addcmul(b[0], a[0], s0)
    return _scan_core(a, B, _lin_a, _lin_b)


def next_reversed(a):
    """The coefficients of the adjoint's scan: reversed time u = T-1-t uses a_{t+1} = a_{T-u}; the
    coefficient at u = 0 multiplies the zero initial adjoint, so any value works there (a_0 is
    reused to avoid allocating). A time extent of 1 (constant in time) stays as it is."""
    return a if a.shape[0] == 1 else torch.cat((a[:1], a[1:].flip(0)))


def _linear_adjoint(a, g):
    """lam_t = g_t + a_{t+1} lam_{t+1}, lam_{T-1} = g_{T-1}: one scan over time reversed."""
    lam_rev = g.flip(0).to(_promoted_dtype(a, g))
    return _scan_core(next_reversed(a), lam_rev, _lin_a, _lin_b).flip(0)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, s0):
        a_t = _time_leading(a, max(b.dim(), a.dim()))
        states = _linear_forward(a_t, b, s0)
        ctx.save_for_backward(a, s0, states)
        ctx.b_shape, ctx.b_dtype = tuple(b.shape), b.dtype
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, g):
        a, s0, states = ctx.saved_tensors
        a_t = _time_leading(a, states.dim())
        lam = _linear_adjoint(a_t, g)
        grad_a = grad_b = grad_s0 = None
        if ctx.needs_input_grad[0]:
            if a_t.shape[0] == 1:  # constant decay: sum over time first, then over broadcast dims
                prod = (lam[1:] * states[:-1]).sum(0, keepdim=True) + lam[:1] * s0
            else:
                prod = torch.empty_like(lam)
                prod[1:] = lam[1:] * states[:-1]
                prod[0] = lam[0] * s0
            grad_a = _sum_to(prod, a_t.shape).reshape(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(lam, ctx.b_shape).to(ctx.b_dtype)
        if ctx.needs_input_grad[2]:
            grad_s0 = _sum_to(a_t[0] * lam[0], s0.shape).to(s0.dtype)
        return grad_a, grad_b, grad_s0


def linear_scan(a: torch.Tensor, b: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """All states of s_t = a_t * s_{t-1} + b_t with s_{-1} = s0, time-major.

    b: [T, N, *shape]; a broadcasts to b (right-aligned, e.g. [T, N, K, 1] for b [T, N, K, V], [T, 1, ...],
    or 0-d; a time extent of 1 means constant in time and is never expanded); s0: [N, *shape] (broadcasts
    to b[0]). Returns [T, N, *shape] in the promoted dtype. Log depth, O(T) work; differentiable in a, b
    and s0 with a backward that is one reversed scan (O(T) memory).
    """
    if b.dim() == 0:
        raise ValueError("linear_scan: b must have a leading time dimension")
    if a.dim() > b.dim() or s0.dim() >= b.dim():
        raise ValueError(f"linear_scan: a {tuple(a.shape)} and s0 {tuple(s0.shape)} must broadcast to b "
                         f"{tuple(b.shape)} and b[0]")
    return _LinearScan.apply(a, b, s0)


# ---- block (k-by-k matrix) scan ------------------------------------------------------------------

def _matvec(A, v):
    """A [..., k, k] @ v [..., k] for tiny k: k elementwise multiply-adds beat a batched matmul of
    millions of 2x2 matrices on CPU and broadcast the leading dims for free."""
    out = A[..., 0] * v[..., 0:1]
    for col in range(1, A.shape[-1]):
        out = torch.addcmul(out, A[..., col], v[..., col:col + 1])
    return out


def _matmul(A2, A1):
    """A2 [..., k, k] @ A1 [..., k, k] as k broadcast multiply-adds (same reason as _matvec)."""
    out = A2[..., :, 0:1] * A1[..., 0:1, :]
    for mid in range(1, A2.shape[-1]):
        out = torch.addcmul(out, A2[..., :, mid:mid + 1], A1[..., mid:mid + 1, :])
    return out


def _blk_b(a_later, b_earlier, b_later):
    return _matvec(a_later, b_earlier).add_(b_later)


def _block_forward(A, b, s0):
    shape = _broadcast_shape(A.shape[:-1], b.shape, (1,) + tuple(s0.shape))
    B = torch.empty(shape, dtype=_promoted_dtype(A, b, s0), device=b.device)
    B[1:] = b[1:]
    B[0] = _matvec(A[0], s0.expand(shape[1:])) + b[0]
    return _scan_core(A, B, _matmul, _blk_b)


def _block_adjoint(A, g):
    """lam_t = g_t + A_{t+1}^T lam_{t+1}: one reversed block scan with transposed blocks."""
    lam_rev = g.flip(0).to(_promoted_dtype(A, g))
    return _scan_core(next_reversed(A.transpose(-1, -2)), lam_rev, _matmul, _blk_b).flip(0)


class _BlockScan(torch.autograd.Function):
    """kernels: (forward(A_t, b, s0), adjoint(A_t, g)): torch's here, Triton's on backend triton."""

    @staticmethod
    def forward(ctx, A, b, s0, kernels=None):
        forward, ctx.adjoint = kernels or (_block_forward, _block_adjoint)
        A_t = _time_leading(A, max(b.dim() + 1, A.dim()))
        states = forward(A_t, b, s0)
        ctx.save_for_backward(A, s0, states)
        ctx.b_shape, ctx.b_dtype = tuple(b.shape), b.dtype
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, g):
        A, s0, states = ctx.saved_tensors
        A_t = _time_leading(A, states.dim() + 1)
        lam = ctx.adjoint(A_t, g)
        grad_A = grad_b = grad_s0 = None
        if ctx.needs_input_grad[0]:
            s_prev = torch.cat((s0.expand(states.shape[1:])[None], states[:-1]))
            outer = lam.unsqueeze(-1) * s_prev.unsqueeze(-2)  # [..., i, j] = lam_i * s_prev_j
            grad_A = _sum_to(outer, A_t.shape).reshape(A.shape).to(A.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(lam, ctx.b_shape).to(ctx.b_dtype)
        if ctx.needs_input_grad[2]:
            grad_s0 = _sum_to(_matvec(A_t[0].transpose(-1, -2), lam[0]), s0.shape).to(s0.dtype)
        return grad_A, grad_b, grad_s0, None


def block_scan(A: torch.Tensor, b: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """All states of s_t = A_t @ s_{t-1} + b_t with s_{-1} = s0, time-major, per element of E.

    A: [T, N, *E, k, k] (leading dims broadcast to b's; a time extent of 1 means constant in time),
    b: [T, N, *E, k], s0: [N, *E, k]. Returns [T, N, *E, k]. Log depth, O(T) work, k small (1-4);
    differentiable with a backward that is one reversed block scan with transposed blocks.
    """
    if (b.dim() == 0 or A.dim() < 2 or A.dim() > b.dim() + 1 or s0.dim() >= b.dim()
            or A.shape[-1] != A.shape[-2] or A.shape[-1] != b.shape[-1]):
        raise ValueError(f"block_scan: A {tuple(A.shape)} must be [..., k, k] and b {tuple(b.shape)} "
                         f"[T, ..., k]")
    return _BlockScan.apply(A, b, s0)


linear_adjoint = _linear_adjoint  # what newton_solve's backward calls (and backend triton's twin)
block_adjoint = _block_adjoint
