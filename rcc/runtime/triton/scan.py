"""Linear scans in Triton (backend triton, plans scan and newton): s_t = a_t * s_{t-1} + b_t.

Same contract as rcc.runtime.scan.linear_scan (time-major, a broadcasting to b, s0 to b[0]).

Forward: one program per block of BLOCK_M columns (the batch and state entries, flattened) walks
the sequence in chunks of BLOCK_T steps: tl.associative_scan composes the chunk's affine steps
(a, b) in log depth, then the carry (the state before the chunk) enters as s = A s_carry + B and
the chunk's last state is carried on. Time is the only sequential axis, BLOCK_T steps at a time.

Backward: the adjoint lam_t = g_t + a_{t+1} lam_{t+1} is the same scan over reversed time (each
chunk loaded latest step first), then grad_a_t = lam_t s_{t-1} in the same pass; torch sums
grad_a down to a's broadcast shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..scan import _BlockScan, _sum_to, _time_leading, next_reversed
from .common import accumulator, check, tuned

BLOCK_T = 32  # steps per chunk (the tests' T=40 crosses a chunk edge)
# columns per program and warps, tuned by the number of columns
CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in ((64, 4), (32, 2), (128, 4), (256, 8))]


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    # s -> a_then * (a_first * s + b_first) + b_then
    return a_first * a_then, a_then * b_first + b_then


@tuned("M", configs=CONFIGS)
@triton.jit(do_not_specialize=["T", "M", "a_st"])  # a new length or batch never recompiles
def _linear_scan_forward(a_ptr, b_ptr, s0_ptr, out_ptr, T, M, a_st,
                         ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    carry = tl.load(s0_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    steps = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + steps
        ok = (t < T)[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + t[:, None] * a_st + cols[None, :], mask=ok, other=1.0).to(ACC)
        b = tl.load(b_ptr + t[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        A, B = tl.associative_scan((a, b), 0, _compose)
        s = A * carry[None, :] + B
        tl.store(out_ptr + t[:, None] * M + cols[None, :], s, mask=ok)
        last = tl.minimum(T - t0, BLOCK_T) - 1
        carry = tl.sum(tl.where(steps[:, None] == last, s, 0.0), 0)


@tuned("M", configs=CONFIGS)
@triton.jit(do_not_specialize=["T", "M", "a_st"])  # a new length or batch never recompiles
def _linear_scan_backward(a_ptr, s_ptr, s0_ptr, g_ptr, lam_ptr, da_ptr, T, M, a_st,
                          ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    carry = tl.zeros((BLOCK_M,), ACC)  # lam of the step after the chunk
    steps = tl.arange(0, BLOCK_T)
    s0 = tl.load(s0_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    for c in range(0, T, BLOCK_T):
        t = T - 1 - c - steps  # latest step first
        ok = (t >= 0)[:, None] & col_ok[None, :]
        after = (t + 1 < T)[:, None] & ok
        a_next = tl.load(a_ptr + (t[:, None] + 1) * a_st + cols[None, :], mask=after, other=0.0).to(ACC)
        g = tl.load(g_ptr + t[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        A, L = tl.associative_scan((tl.where(ok, a_next, 1.0), g), 0, _compose)
        lam = A * carry[None, :] + L
        tl.store(lam_ptr + t[:, None] * M + cols[None, :], lam, mask=ok)
        before = (t >= 1)[:, None] & ok
        s_prev = tl.load(s_ptr + (t[:, None] - 1) * M + cols[None, :], mask=before, other=0.0).to(ACC)
        s_prev = tl.where((t == 0)[:, None], s0[None, :], s_prev)
        tl.store(da_ptr + t[:, None] * M + cols[None, :], lam * s_prev, mask=ok)
        last = tl.minimum(T - c, BLOCK_T) - 1
        carry = tl.sum(tl.where(steps[:, None] == last, lam, 0.0), 0)


def _grid(M):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def _columns(a, b):
    """a as [Ta, M] rows over b's M = N * prod(state) columns (Ta = T, or 1 with stride 0)."""
    T = b.shape[0]
    a = _time_leading(a, b.dim())
    rows = a.shape[0]
    a = a.expand(rows, *b.shape[1:]).reshape(rows, -1)  # a copy only where a broadcasts
    return a.contiguous(), (0 if rows == 1 and T > 1 else a.shape[1])


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, s0):
        T = b.shape[0]
        M = b[0].numel()
        dtype = b.dtype
        ac, a_st = _columns(a.to(dtype), b)
        bc = b.contiguous()
        s0c = s0.to(dtype).expand(b.shape[1:]).contiguous()
        out = torch.empty_like(bc)
        _linear_scan_forward[_grid(M)](ac, bc, s0c, out, T, M, a_st, ACC=accumulator(dtype), BLOCK_T=BLOCK_T)
        ctx.save_for_backward(ac, s0c, out)
        ctx.a_st, ctx.shapes, ctx.dtypes = a_st, (a.shape, b.shape, s0.shape), (a.dtype, s0.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, g):
        ac, s0c, out = ctx.saved_tensors
        a_shape, b_shape, s0_shape = ctx.shapes
        T, M = out.shape[0], out[0].numel()
        g = g.contiguous()
        lam, da = torch.empty_like(out), torch.empty_like(out)
        _linear_scan_backward[_grid(M)](ac, out, s0c, g, lam, da, T, M, ctx.a_st, ACC=accumulator(out.dtype),
                                        BLOCK_T=BLOCK_T)
        a_t = ac[0].view(b_shape[1:])
        lam = lam.view(b_shape)
        grad_s0 = _sum_to(a_t * lam[0], s0_shape)
        a_full = (1,) * (len(b_shape) - len(a_shape)) + tuple(a_shape)
        grad_a = _sum_to(da.view(b_shape), a_full).reshape(a_shape)
        return grad_a.to(ctx.dtypes[0]), lam, grad_s0.to(ctx.dtypes[1])


def linear_scan(a: torch.Tensor, b: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """All states of s_t = a_t * s_{t-1} + b_t with s_{-1} = s0, time-major, by Triton kernels.

    b: [T, N, *shape]; a broadcasts to b (right-aligned; a time extent of 1 means constant in time);
    s0 broadcasts to b[0]. Returns [T, N, *shape] in b's dtype (computed in float32, or float64),
    differentiable in a, b and s0."""
    if not _has_steps("linear_scan", a, b, s0):
        return b.clone()
    return _LinearScan.apply(a, b, s0)


def _has_steps(what, a, b, s0, init="s0") -> bool:
    """A scan's arguments checked (a broadcasting to b, the initial state `init` to b[0], a dtype
    and device the kernels run); whether b has any step."""
    if b.dim() == 0 or a.dim() > b.dim() or s0.dim() >= b.dim():
        raise ValueError(f"{what}: a {tuple(a.shape)} and {init} {tuple(s0.shape)} must broadcast to b "
                         f"{tuple(b.shape)} and b[0]")
    check([b], f"{what} (backend 'triton')")
    return b.shape[0] > 0


def linear_adjoint(a, g):
    """lam_t = g_t + a_{t+1} lam_{t+1} (time-major, a broadcasting to g): the scan over reversed
    time. Not differentiable (newton_solve's backward calls it under no_grad)."""
    a_next_rev = next_reversed(_time_leading(a, g.dim()))
    with torch.no_grad():
        return linear_scan(a_next_rev, g.flip(0).contiguous(), torch.zeros_like(g[0])).flip(0)


# ---- k-by-k blocks: s_t = A_t @ s_{t-1} + b_t ------------------------------------------------------
# tl.associative_scan composes scalars, so a k-by-k block is k*k + k tensors and the composition
# is written out entry by entry: the kernel for each k is printed from the template below once per
# process (k is small: the coupled states of one Newton block).

def _block_source(k: int) -> str:
    A = [[f"a{i}{j}" for j in range(k)] for i in range(k)]
    first = [f"{x}_1" for row in A for x in row] + [f"b{i}_1" for i in range(k)]
    then = [f"{x}_2" for row in A for x in row] + [f"b{i}_2" for i in range(k)]
    compose = []
    for i in range(k):
        for j in range(k):
            terms = " + ".join(f"a{i}{m}_2 * a{m}{j}_1" for m in range(k))
            compose.append(f"    c{i}{j} = {terms}")
    for i in range(k):
        terms = " + ".join(f"a{i}{m}_2 * b{m}_1" for m in range(k))
        compose.append(f"    d{i} = {terms} + b{i}_2")
    outs = [f"c{i}{j}" for i in range(k) for j in range(k)] + [f"d{i}" for i in range(k)]
    loads = []
    for i in range(k):
        for j in range(k):
            one = "1.0" if i == j else "0.0"
            loads.append(f"        a{i}{j} = tl.load(A_ptr + t[:, None] * A_st + cols[None, :] * {k * k} + "
                         f"{i * k + j}, mask=ok, other={one}).to(ACC)")
    for i in range(k):
        loads.append(f"        b{i} = tl.load(b_ptr + (t[:, None] * M + cols[None, :]) * {k} + {i}, "
                     f"mask=ok, other=0.0).to(ACC)")
    scanned = ", ".join(f"P{i}{j}" for i in range(k) for j in range(k)) + ", " + \
        ", ".join(f"Q{i}" for i in range(k))
    inputs = ", ".join([f"a{i}{j}" for i in range(k) for j in range(k)] + [f"b{i}" for i in range(k)])
    apply = [f"        s{i} = " + " + ".join(f"P{i}{j} * c{j}[None, :]" for j in range(k)) + f" + Q{i}"
             for i in range(k)]
    stores = [f"        tl.store(out_ptr + (t[:, None] * M + cols[None, :]) * {k} + {i}, s{i}, mask=ok)"
              for i in range(k)]
    carries = [f"        c{i} = tl.sum(tl.where(steps[:, None] == last, s{i}, 0.0), 0)" for i in range(k)]
    init = [f"    c{i} = tl.load(s0_ptr + cols * {k} + {i}, mask=col_ok, other=0.0).to(ACC)"
            for i in range(k)]
    return "\n".join([
        '"""rcc: the block scan kernel for k = %d (printed by rcc.runtime.triton.scan)."""' % k,
        "import triton", "import triton.language as tl", "",
        "from rcc.runtime.triton.common import tuned",
        "from rcc.runtime.triton.scan import CONFIGS", "", "",
        "@triton.jit", f"def compose({', '.join(first + then)}):",
        "    # first (A1, b1), then (A2, b2): (A2 A1, A2 b1 + b2)",
        *compose, f"    return {', '.join(outs)}", "", "",
        '@tuned("M", configs=CONFIGS)', '@triton.jit(do_not_specialize=["T", "M", "A_st"])',
        "def block_scan_forward(A_ptr, b_ptr, s0_ptr, out_ptr, T, M, A_st,",
        "                       ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):",
        "    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    col_ok = cols < M",
        *init,
        "    steps = tl.arange(0, BLOCK_T)",
        "    for t0 in range(0, T, BLOCK_T):",
        "        t = t0 + steps",
        "        ok = (t < T)[:, None] & col_ok[None, :]",
        *loads,
        f"        {scanned} = tl.associative_scan(({inputs}), 0, compose)",
        *apply, *stores,
        "        last = tl.minimum(T - t0, BLOCK_T) - 1",
        *carries, ""])


_BLOCK_KERNELS: dict = {}


def _block_kernel(k):
    """The forward kernel for k-by-k blocks, printed to the cache and imported (Triton reads a
    kernel's source from its file)."""
    if k not in _BLOCK_KERNELS:
        import importlib.util
        import os

        from ..cache import cache_dir, hold, private_dir
        directory = private_dir(os.path.join(private_dir(cache_dir()), "triton"))
        path = os.path.join(directory, f"rcc_block_scan_k{k}.py")
        hold(path, _block_source(k))
        spec = importlib.util.spec_from_file_location(f"rcc_block_scan_k{k}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _BLOCK_KERNELS[k] = module.block_scan_forward
    return _BLOCK_KERNELS[k]


def block_scan(A: torch.Tensor, b: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """All states of s_t = A_t @ s_{t-1} + b_t (as rcc.runtime.scan.block_scan: A [T or 1, N, *E,
    k, k] broadcasting, b [T, N, *E, k], s0 [N, *E, k]), by a Triton kernel; differentiable, the
    backward one reversed block scan (block_adjoint), as rcc.runtime.scan's."""
    return _BlockScan.apply(A, b, s0, (_block_states, block_adjoint))


def _block_states(A, b, s0):
    check([b], "block_scan (backend 'triton')")
    k, T = b.shape[-1], b.shape[0]
    if T == 0:
        return b.clone()
    dtype = b.dtype
    A = _time_leading(A.to(dtype), b.dim() + 1)
    rows = A.shape[0]
    Ac = A.expand(rows, *b.shape[1:], k).reshape(rows, -1).contiguous()
    bc = b.contiguous()
    M = bc[0].numel() // k
    s0c = s0.to(dtype).expand(b.shape[1:]).contiguous()
    out = torch.empty_like(bc)
    _block_kernel(k)[_grid(M)](Ac, bc, s0c, out, T, M, 0 if rows == 1 else Ac.shape[1], ACC=accumulator(dtype),
                               BLOCK_T=BLOCK_T)
    return out


def block_adjoint(A, g):
    """lam_t = g_t + A_{t+1}^T lam_{t+1}: the block scan over reversed time, transposed blocks."""
    At_next_rev = next_reversed(_time_leading(A, g.dim() + 1).transpose(-1, -2))
    with torch.no_grad():
        return block_scan(At_next_rev, g.flip(0).contiguous(), torch.zeros_like(g[0])).flip(0)
