"""The max-plus scan in Triton: m_t = max(m_{t-1} + a_t, b_t) for every step (xLSTM's mLSTM
stabiliser, computed before plan chunk's kernels), with the contract of
rcc.runtime.maxplus.maxplus_scan (time-major, a broadcasting to b, m0 to b[0]). At an exact tie
the gradient splits in half, as the sequential step's torch.maximum does (the torch form's
cummax gives it to one side).

Forward: as scan.py's linear scan, one program per block of columns walks time in chunks of
BLOCK_T steps. tl.associative_scan composes the chunk's maps m -> max(m + a, b): (a1, b1) then
(a2, b2) is (a1 + a2, max(b1 + a2, b2)), so nothing is subtracted and every sum has at most
BLOCK_T terms; the carry enters as max(m + A, B).

Backward: the step selects a branch, s_t = 1 where m_{t-1} + a_t > b_t, 0 where it is below,
1/2 at a tie (torch.maximum's rule). The adjoint lam_t = g_t + s_{t+1} lam_{t+1} is a linear scan
over reversed time, in the same kernel: grad a_t = s_t lam_t, grad b_t = (1 - s_t) lam_t, and
the state before the sequence gets s_0 lam_0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..scan import _sum_to
from .common import accumulator, tuned
from .scan import BLOCK_T, CONFIGS, _columns, _compose, _grid, _has_steps


@triton.jit
def _compose_maxplus(a_first, b_first, a_then, b_then):
    # m -> max(max(m + a_first, b_first) + a_then, b_then)
    return a_first + a_then, tl.maximum(b_first + a_then, b_then)


@triton.jit
def _branch(m_prev, a, b):
    # d m_t / d m_{t-1}: 1 on the first branch of max(m_{t-1} + a_t, b_t), 1/2 at a tie
    p = m_prev + a
    return tl.where(p > b, 1.0, tl.where(p == b, 0.5, 0.0))


@tuned("M", configs=CONFIGS)
@triton.jit(do_not_specialize=["T", "M", "a_st"])  # a new length or batch never recompiles
def _maxplus_forward(a_ptr, b_ptr, m0_ptr, out_ptr, T, M, a_st,
                     ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    carry = tl.load(m0_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    steps = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + steps
        ok = (t < T)[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + t[:, None] * a_st + cols[None, :], mask=ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + t[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        b = tl.where(ok, b, -float("inf"))  # steps past the end keep m
        A, B = tl.associative_scan((a, b), 0, _compose_maxplus)
        m = tl.maximum(carry[None, :] + A, B)
        tl.store(out_ptr + t[:, None] * M + cols[None, :], m, mask=ok)
        last = tl.minimum(T - t0, BLOCK_T) - 1
        carry = tl.sum(tl.where(steps[:, None] == last, m, 0.0), 0)


@tuned("M", configs=CONFIGS)
@triton.jit(do_not_specialize=["T", "M", "a_st"])  # a new length or batch never recompiles
def _maxplus_backward(a_ptr, b_ptr, m_ptr, m0_ptr, g_ptr, da_ptr, db_ptr, T, M, a_st,
                      ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    carry = tl.zeros((BLOCK_M,), ACC)  # lam of the step after the chunk
    steps = tl.arange(0, BLOCK_T)
    m0 = tl.load(m0_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    for c in range(0, T, BLOCK_T):
        t = T - 1 - c - steps  # latest step first
        ok = (t >= 0)[:, None] & col_ok[None, :]
        after = (t + 1 < T)[:, None] & ok
        m_here = tl.load(m_ptr + t[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        a_next = tl.load(a_ptr + (t[:, None] + 1) * a_st + cols[None, :], mask=after, other=0.0).to(ACC)
        b_next = tl.load(b_ptr + (t[:, None] + 1) * M + cols[None, :], mask=after, other=0.0).to(ACC)
        s_next = tl.where(after, _branch(m_here, a_next, b_next), 0.0)
        g = tl.load(g_ptr + t[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        S, L = tl.associative_scan((tl.where(ok, s_next, 1.0), g), 0, _compose)
        lam = S * carry[None, :] + L
        before = (t >= 1)[:, None] & ok
        m_prev = tl.load(m_ptr + (t[:, None] - 1) * M + cols[None, :], mask=before, other=0.0).to(ACC)
        m_prev = tl.where((t == 0)[:, None], m0[None, :], m_prev)
        a = tl.load(a_ptr + t[:, None] * a_st + cols[None, :], mask=ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + t[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        s = _branch(m_prev, a, b)
        tl.store(da_ptr + t[:, None] * M + cols[None, :], s * lam, mask=ok)
        tl.store(db_ptr + t[:, None] * M + cols[None, :], (1.0 - s) * lam, mask=ok)
        last = tl.minimum(T - c, BLOCK_T) - 1
        carry = tl.sum(tl.where(steps[:, None] == last, lam, 0.0), 0)


class _MaxPlusScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, m0):
        T, M, dtype = b.shape[0], b[0].numel(), b.dtype
        ac, a_st = _columns(a.to(dtype), b)
        bc = b.contiguous()
        m0c = m0.to(dtype).expand(b.shape[1:]).contiguous()
        # m in the accumulator's precision: the backward finds each step's branch from it as the
        # forward took it (rounded to bf16, 1-2% of the branches flipped)
        out = torch.empty(bc.shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=bc.device)
        _maxplus_forward[_grid(M)](ac, bc, m0c, out, T, M, a_st, ACC=accumulator(dtype), BLOCK_T=BLOCK_T)
        ctx.save_for_backward(ac, bc, m0c, out)
        ctx.a_st, ctx.shapes, ctx.dtypes = a_st, (a.shape, m0.shape), (a.dtype, b.dtype, m0.dtype)
        return out.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, g):
        ac, bc, m0c, out = ctx.saved_tensors
        a_shape, m0_shape = ctx.shapes
        T, M = out.shape[0], out[0].numel()
        da, db = torch.empty_like(out), torch.empty_like(out)
        _maxplus_backward[_grid(M)](ac, bc, out, m0c, g.contiguous(), da, db, T, M, ctx.a_st,
                                    ACC=accumulator(out.dtype), BLOCK_T=BLOCK_T)
        grad_m0 = _sum_to(da[0], m0_shape)  # s_0 lam_0, as grad a_0
        a_full = (1,) * (out.dim() - len(a_shape)) + tuple(a_shape)
        grad_a = _sum_to(da, a_full).reshape(a_shape)
        return grad_a.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), grad_m0.to(ctx.dtypes[2])


def maxplus_scan(a: torch.Tensor, b: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    """All m_t = max(m_{t-1} + a_t, b_t), m_{-1} = m0, by Triton kernels. b: [T, N, *shape]; a
    broadcasts to b (right-aligned; a time extent of 1 means constant in time); m0 broadcasts to
    b[0]. Returns [T, N, *shape] in b's dtype (computed in float32, or float64), differentiable
    in a, b and m0."""
    if not _has_steps("maxplus_scan", a, b, m0, "m0"):
        return b.clone()
    return _MaxPlusScan.apply(a, b, m0)
