"""Parallel-in-time Newton solve of a nonlinear recurrence s_t = f(s_{t-1}, x_t) (DEER / ParaRNN style):
each iteration linearises f along the whole trajectory and solves the linear recurrence with one scan.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import scan as _torch_scans

__all__ = ["newton_solve"]

# Summary of algorithm (newton_solve):
#   Unknowns: the whole trajectory h = (h_0 .. h_{T-1}); equations h_t = f(h_{t-1}, x_t), h_{-1} = s0.
#   0. warm start h_t = f(s0, x_t) for every t (one batched step call with prev = s0 everywhere).
#   1. prev = shift(h) (s0 at t = 0); (F, J) = jacobian(prev) in one batched call over all T*N rows.
#      Residual r_t = max |h_t - F_t| / max(1, |F_t|) (elementwise, over all states and batch).
#   2. if max r <= tol: done. Else solve the linearisation h'_t = J_t h'_{t-1} + (F_t - J_t prev_t),
#      h'_{-1} = s0, with one linear_scan (k = 1) or block_scan (k coupled states, k-by-k blocks).
#      Newton's method on this system converges in ~2-6 iterations for contractive cells (quadratically
#      once close; the equations are lower block-bidiagonal so step 2 is exact Gauss elimination).
#   3. Levenberg-Marquardt style damping: the step is taken with J/(1 + lam). Newton's residual is not
#      monotone (a step may overshoot where the cell saturates and still land next time), so a
#      candidate is rejected only when its residual is NaN/inf or over 1e6 times the current one; lam
#      then grows (0 -> 1 -> x8 ...). A new best residual shrinks lam (/8, then back to 0); 3 accepted
#      iterations without one grow it. lam -> inf is the Picard/Jacobi sweep h' = F, always finite and
#      exact on at least one more time step per sweep: once lam passes 1e6 it is used as is.
#   4. Not converged within max_iter: keep the prefix before the first time step whose residual is
#      above tol and finish with a plain loop of `step` ([N]-row slices), warn, stats["fallback"] = True.
#
# Tolerance. The residual can not drop below rounding: f itself is computed to a few ulps, and the
# tree scan adds ~log2(T) roundings to each state, so the floor is ~ eps * (log2 T + c) relative to the
# state scale. Default tol = 4 * eps * (log2(T) + 4) (float64, T = 1000: 1.2e-14; float32: 6.6e-6).
# The error e_t of a trajectory whose residuals are all <= tol obeys e_t = J_t e_{t-1} + r_t, so for a
# non-expansive cell |e_t| <= t * tol: eps * T (the loop's own worst-case rounding) times a small log
# factor, and much less for a contractive one (tol / (1 - |J|)). If the residual stalls above tol but
# within 64 * tol (a full Newton step no longer halves it: rounding-dominated) the iterate is accepted
# as converged at the floor.
#
# Gradients (custom autograd.Function; the iterations are never differentiated):
#   at the solution h, the adjoint lam_t = g_t + J_{t+1}^T lam_{t+1} (g = grad of the trajectory) is
#   one reversed scan with transposed blocks; then one batched VJP of step(shift(h), *args) over all
#   T*N rows with cotangent lam gives the grads of the args, and of prev, whose t = 0 rows are the
#   grad of s0 (implicit-function theorem: sum_t (df_t/dtheta)^T lam_t).

_LAM_START, _LAM_GROW, _LAM_SHRINK, _LAM_PICARD = 1.0, 8.0, 8.0, 1e6
_FLOOR_FACTOR = 64.0
_GROWTH = 1e6  # a candidate residual this many times the current one is a blow-up
_PATIENCE = 3  # iterations without a new best residual before damping


def _default_tol(dtype, T):
    return 4.0 * torch.finfo(dtype).eps * (math.log2(T) + 4.0)


class _Problem:
    """The fixed parts of one solve: the functions, the shapes, and how to slice args per step."""

    def __init__(self, step, jacobian, s0, args, seq_mask, k, T, scans):
        self.step, self.jacobian, self.s0, self.args, self.seq_mask = step, jacobian, s0, args, seq_mask
        self.scans = scans  # linear_scan, block_scan, linear_adjoint, block_adjoint
        self.k, self.T = k, T
        self.N = s0[0].shape[0]
        self.shape = tuple(s0[0].shape[1:])
        self.stats = None  # filled by the solve

    def flat(self, x):  # [T, N, *shape] -> [T*N, *shape]
        return x.reshape((self.T * self.N,) + self.shape)

    def time_major(self, x):  # [T*N, *shape] -> [T, N, *shape]; broadcast parameters stay as they are
        x = torch.as_tensor(x, dtype=self.s0[0].dtype, device=self.s0[0].device)
        if x.dim() == 1 + len(self.shape) and x.shape[0] == self.T * self.N:
            return x.reshape((self.T, self.N) + tuple(x.shape[1:]))  # [rows, 1]: per-row scalars
        if x.dim() > 1 + len(self.shape):
            raise ValueError(f"newton_solve: Jacobian entry of shape {tuple(x.shape)} does not broadcast "
                             f"to [T*N, *{list(self.shape)}]")
        return x

    def shift(self, h):
        """prev_t = h_{t-1}, prev_0 = s0 (flat)."""
        rows = self.N
        return tuple(torch.cat((s.reshape((rows,) + self.shape), x[:-rows])) for s, x in zip(self.s0, h))

    def broadcast_s0(self):
        return tuple(self.flat(s.unsqueeze(0).expand((self.T,) + tuple(s.shape))) for s in self.s0)

    def evaluate(self, h):
        """(F, J) at prev = shift(h), and the per-time relative residual [T] (inf where not finite)."""
        F, J = self.jacobian(self.shift(h), *self.args)
        F = tuple(F)
        per_t = torch.zeros(self.T, dtype=torch.float64, device=h[0].device)
        for h_i, F_i in zip(h, F):
            # Elementwise mixed absolute/relative: a global scale would let one huge (diverged) value
            # hide wrong small ones elsewhere.
            rel = ((h_i - F_i).abs() / F_i.abs().clamp(min=1.0)).reshape(self.T, -1).amax(1).double()
            per_t = torch.maximum(per_t, rel.nan_to_num(math.inf, math.inf))  # amax propagates NaN
        return F, J, per_t

    def newton_update(self, F, J, prev, damping):
        """Solve h'_t = Jd_t h'_{t-1} + (F_t - Jd_t prev_t), Jd = J / (1 + damping), with one scan."""
        k, factor = self.k, 1.0 / (1.0 + damping)
        if k == 1:
            j = J[0][0]
            if j is None:
                return F
            j = self.time_major(j) * factor
            b = self.time_major(F[0]) - j * self.time_major(prev[0])
            return (self.flat(self.scans.linear_scan(j, b, self.s0[0])),)
        zero = torch.zeros((), dtype=F[0].dtype, device=F[0].device)
        entries = [[zero if J[i][j] is None else self.time_major(J[i][j]) * factor for j in range(k)]
                   for i in range(k)]
        flat_entries = torch.broadcast_tensors(*[e for row in entries for e in row])
        A = torch.stack([torch.stack(flat_entries[i * k:(i + 1) * k], -1) for i in range(k)], -2)
        prev_tm = [self.time_major(p) for p in prev]
        b = torch.stack([self.time_major(F[i]) - sum(entries[i][j] * prev_tm[j] for j in range(k))
                         for i in range(k)], -1)
        s0 = torch.stack([s.expand((self.N,) + self.shape) for s in self.s0], -1)
        states = self.scans.block_scan(A, b, s0)
        return tuple(self.flat(states[..., i]) for i in range(k))

    def args_at(self, t):
        N = self.N
        return tuple(a[t * N:(t + 1) * N] if seq else a for a, seq in zip(self.args, self.seq_mask))

    def sequential_from(self, h, t0):
        """Keep h before t0; run step one time step at a time from there."""
        N = self.N
        out = [x.clone() for x in h]
        state = tuple(s.expand((N,) + self.shape) if t0 == 0 else x[(t0 - 1) * N:t0 * N]
                      for s, x in zip(self.s0, out))
        for t in range(t0, self.T):
            state = tuple(self.step(state, *self.args_at(t)))
            for o, s in zip(out, state):
                o[t * N:(t + 1) * N] = s
        return tuple(out)


def _solve(problem, max_iter, tol):
    p = problem
    stats = {"iterations": 0, "residual": 0.0, "converged": False, "damped": 0, "fallback": False}
    h = tuple(p.step(p.broadcast_s0(), *p.args))
    F, J, per_t = p.evaluate(h)
    r = best = per_t.max().item()
    lam, since_best, stalled = 0.0, 0, False
    while r > tol and p.T > 1 and stats["iterations"] < max_iter:
        stats["iterations"] += 1
        stats["damped"] += lam > 0
        picard = lam >= _LAM_PICARD
        candidate = F if picard else p.newton_update(F, J, p.shift(h), lam)
        F_c, J_c, per_t_c = p.evaluate(candidate)
        r_c = per_t_c.max().item()
        if not math.isfinite(r_c) or (not picard and r_c > _GROWTH * max(r, tol)):
            lam = _LAM_START if lam == 0 else lam * _LAM_GROW  # overflow or blow-up: damp harder
            continue
        if lam == 0 and r <= _FLOOR_FACTOR * tol and r_c > 0.5 * r:
            stalled = True  # a full Newton step no longer halves it: the rounding floor
            if r_c >= r:
                break
        h, F, J, per_t, r = candidate, F_c, J_c, per_t_c, r_c
        if stalled:
            break
        # Newton's residual is not monotone (a step can overshoot where the cell saturates and still
        # converge next time), so only a run of iterations without a new best counts as failing.
        if r < best:
            best, since_best = r, 0
            lam = 0.0 if lam < _LAM_START else lam / _LAM_SHRINK
        else:
            since_best += 1
            if since_best >= _PATIENCE:
                lam, since_best = (_LAM_START if lam == 0 else lam * _LAM_GROW), 0
    stats["converged"] = r <= tol or stalled
    if not stats["converged"]:
        bad = torch.nonzero(~(per_t <= tol))
        t0 = int(bad[0, 0]) if bad.numel() else 0
        warnings.warn(f"newton_solve: not converged after {stats['iterations']} iterations (relative "
                      f"residual {r:.3g} > tol {tol:.3g}); finished sequentially from time step {t0} "
                      f"of {p.T}", RuntimeWarning, stacklevel=3)
        h = p.sequential_from(h, t0)
        stats["fallback"] = True
        _, _, per_t = p.evaluate(h)
        r = per_t.max().item()
    stats["residual"] = r
    return h, stats


class _NewtonSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem, max_iter, tol, *tensors):
        k = problem.k
        h, stats = _solve(problem, max_iter, tol)
        ctx.problem = problem
        problem.stats = stats
        ctx.save_for_backward(*h)
        return tuple(x.reshape((problem.T, problem.N) + problem.shape) for x in h[:k])

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, *grads):
        p = ctx.problem
        h = ctx.saved_tensors
        k, T, N = p.k, p.T, p.N
        dtype = h[0].dtype
        g = [torch.zeros((T, N) + p.shape, dtype=dtype, device=h[0].device) if gi is None else gi
             for gi in grads]
        prev = p.shift(h)
        with torch.no_grad():
            _, J = p.jacobian(prev, *p.args)
            if k == 1:
                j = J[0][0]
                if j is None:
                    lam = (g[0],)
                else:
                    a = p.time_major(j)
                    a = a.reshape((1,) * (g[0].dim() - a.dim()) + tuple(a.shape))
                    lam = (p.scans.linear_adjoint(a, g[0]),)
            else:
                zero = torch.zeros((), dtype=dtype, device=h[0].device)
                entries = [zero if J[i][j] is None else p.time_major(J[i][j])
                           for i in range(k) for j in range(k)]
                entries = torch.broadcast_tensors(*entries)
                A = torch.stack([torch.stack(entries[i * k:(i + 1) * k], -1) for i in range(k)], -2)
                g_all = torch.stack(g, -1)
                A = A.reshape((1,) * (g_all.dim() + 1 - A.dim()) + tuple(A.shape))  # time leading
                lam_all = p.scans.block_adjoint(A, g_all)
                lam = tuple(lam_all[..., i] for i in range(k))
        n_s0 = len(p.s0)
        s0_needs = ctx.needs_input_grad[3:3 + n_s0]
        arg_needs = ctx.needs_input_grad[3 + n_s0:]
        arg_inputs = [a for a, need in zip(p.args, arg_needs) if need]
        with torch.enable_grad():
            prev_leaf = tuple(x.detach().requires_grad_(any(s0_needs)) for x in prev)
            arg_leaf = [a.detach().requires_grad_() for a in arg_inputs]
            leaf_iter = iter(arg_leaf)
            call_args = tuple(next(leaf_iter) if need else a for a, need in zip(p.args, arg_needs))
            out = tuple(p.step(prev_leaf, *call_args))
            wrt = (list(prev_leaf) if any(s0_needs) else []) + arg_leaf
            # one VJP as the gradient of <out, lam>: torch.autograd.grad with grad_outputs
            # imports sympy (torch's symbolic shapes), which generated modules must not load
            inner = sum((o * p.flat(x).to(o.dtype)).sum() for o, x in zip(out, lam))
            got = torch.autograd.grad(inner, wrt, allow_unused=True) \
                if wrt and inner.requires_grad else [None] * len(wrt)
        got = list(got)
        grads_s0 = [None] * n_s0
        if any(s0_needs):
            prev_grads, got = got[:k], got[k:]
            for i, (s, need) in enumerate(zip(p.s0, s0_needs)):
                if need and prev_grads[i] is not None:
                    grads_s0[i] = prev_grads[i][:N].reshape(s.shape)  # the t = 0 rows are s0
        got_iter = iter(got)
        grads_args = [next(got_iter) if need else None for need in arg_needs]
        return (None, None, None, *grads_s0, *grads_args)


def newton_solve(step, jacobian, s0, args=(), *, block, seq_mask=None, max_iter=None, tol=None,
                 length=None, scans=None):
    """Solve s_t = step(s_{t-1}, args_t) for all t at once by damped Newton iterations over time.

    step(prev, *args) -> next: prev and next are tuples of `block` (= k) tensors [T*N, *shape]
        (time-major flattened rows: row t*N + n is time t, batch n); a plain differentiable torch function.
    jacobian(prev, *args) -> (next, J): the same next plus J, a k-by-k nested tuple with
        J[i][j] = d next_i / d prev_j elementwise (broadcastable to [T*N, *shape]; None means zero).
    s0: tuple of k tensors [N, *shape] (all the same shape).
    args: tuple of the tensors (or python numbers) step reads; seq_mask: parallel tuple of bools, True for
        a time-major sequence [T*N, ...] (sliced per time step when finishing sequentially), False for a
        parameter. length: T, needed only when no arg is a sequence.
    max_iter: Newton iterations before the sequential fallback (default 30; contractive cells take 2-6).
    tol: relative residual tolerance (default 4 * eps * (log2 T + 4), see the comment at the top).
    scans: where linear_scan, block_scan, linear_adjoint and block_adjoint come from (default
        rcc.runtime.scan, torch; backend triton passes its Triton kernels).

    Returns (trajectory, stats): trajectory is a tuple of k tensors [T, N, *shape], the states after each
    step; stats = {"iterations", "residual" (final max relative residual), "converged", "damped"
    (number of damped iterations), "fallback" (finished sequentially; a RuntimeWarning says so)}.
    Differentiable w.r.t. s0 and every arg tensor that requires grad: the backward is one reversed
    (block) scan of the adjoint plus one batched VJP through `step`; the iterations are never
    differentiated.
    """
    s0 = tuple(s0)
    args = tuple(args)
    if len(s0) != block:
        raise ValueError(f"newton_solve: block={block} but {len(s0)} initial states")
    if any(tuple(s.shape) != tuple(s0[0].shape) for s in s0):
        raise ValueError("newton_solve: all states must have the same shape, got "
                         f"{[tuple(s.shape) for s in s0]}")
    if seq_mask is None:
        if any(isinstance(a, torch.Tensor) for a in args):
            raise ValueError("newton_solve: pass seq_mask (which args are [T*N, ...] sequences)")
        seq_mask = (False,) * len(args)
    seq_mask = tuple(bool(m) for m in seq_mask)
    if len(seq_mask) != len(args):
        raise ValueError(f"newton_solve: seq_mask has {len(seq_mask)} entries for {len(args)} args")
    N = s0[0].shape[0]
    seq_rows = {a.shape[0] for a, m in zip(args, seq_mask) if m}
    if len(seq_rows) > 1 or any(rows % N for rows in seq_rows):
        raise ValueError(f"newton_solve: sequence args have {sorted(seq_rows)} rows, want T*N with N={N}")
    T = seq_rows.pop() // N if seq_rows else length
    if T is None or (length is not None and length != T) or T < 1:
        raise ValueError(f"newton_solve: cannot tell T (sequence rows / N = {T}, length = {length})")
    dtype = s0[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        # half-precision inputs: the trajectory, the residuals and the scans in float32 (a
        # half-precision tolerance would stop Newton far from the solution), the result cast back
        s0 = tuple(s.float() for s in s0)
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a for a in args)
    problem = _Problem(step, jacobian, s0, args, seq_mask, block, T, scans or _torch_scans)
    max_iter = 30 if max_iter is None else int(max_iter)
    tol = _default_tol(s0[0].dtype, T) if tol is None else float(tol)
    tensors = tuple(s0) + tuple(a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args)
    trajectory = _NewtonSolve.apply(problem, max_iter, tol, *tensors)
    return tuple(x.to(dtype) for x in trajectory), problem.stats
