"""pLSTM's 2D parallel form in Triton (backend triton, plan chunk over grid2d): the contract of
rcc.runtime.grid_chunk.solve, every edge state of the grid recurrence
    C[x, y, o] = T[x, y, o, 0] C[x-1, y, 0] + T[x, y, o, 1] C[x, y-1, 1] + b[x, y, o]
(o = 0 the edge down to (x+1, y), o = 1 the edge right to (x, y+1); zero outside the grid).

The grid is cut into c x c chunks, E = 2 c^2 edges each. Two kernels:
  _chunk_paths, one program per (row, chunk), all at once: the chunk's transitions between its own
    edges A [E, E] (nilpotent: edges only feed edges further down or right) and the sum of its
    path products P = (I - A)^-1 = (I + A)(I + A^2)(I + A^4)... in log2(2c - 1) squarings.
  _chunk_states, one launch per anti-diagonal of chunks (X/c + Y/c - 1 launches), one program per
    (row, chunk on it, block of state columns): the right-hand side b plus what the 2c border edges
    from the chunks above and to the left (solved by the launch before) bring in, then C = P rhs.
Between launches the states are in global memory; padding rows (chunks past the grid's edge) are
masked, never copied: they come after the grid and feed nothing in it.

Backward: the adjoint of a grid recurrence is one on the flipped grid. With mu[x, y, i] the
gradient reaching node (x, y)'s input slot i and lambda the gradient of b,
    mu[x, y, i] = sum_o T[x, y, o, i] (dC[x, y, o] + mu[next_o(x, y), o]),
    lambda[x, y, o] = dC[x, y, o] + mu[next_o(x, y), o],  dT[x, y, o, i] = lambda[x, y, o] . C_in[x, y, i]
(next_0 = (x+1, y), next_1 = (x, y+1)); flipped in x and y, mu's recurrence is the forward's with T
transposed per node, so the backward runs the same two kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import accumulator, check, interpreted, tuned

MAX_CHUNK = 8  # P is an [E, E] tile, E = 2 c^2 <= 128
MAX_CHUNK_WITHOUT_DOT = 4  # without tl.dot (float64, the interpreter) a product is an [E, E, E] tile


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


def dot_mode(dtype, *sizes) -> int:
    """_mm's MODE: tl.dot where the GPU compiler takes it (every size at least 16, not float64),
    on bfloat16 operands for half-precision inputs; else products and sums (the interpreter)."""
    if interpreted() or dtype == torch.float64 or min(sizes) < 16:
        return 0
    return 2 if dtype in (torch.bfloat16, torch.float16) else 1


def _wide(dtype):
    """The float type of the kernels' work buffers (saved chunk states, partial gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _chunk_edges(I, J, X, Y, C: tl.constexpr, PE: tl.constexpr):
    # the rows r = (a * C + b) * 2 + o of chunk (I, J): node (a, b) of the chunk, its out-edge o,
    # the node's place (x, y) on the grid, whether it is on it
    r = tl.arange(0, PE)
    a, b, o = (r // 2) // C, (r // 2) % C, r % 2
    x, y = I * C + a, J * C + b
    return r, a, b, o, x, y, (r < 2 * C * C) & (x < X) & (y < Y)


@tuned("PE")  # warps per program
@triton.jit
def _chunk_paths(t_ptr, p_ptr, X, Y, NY, ACC: tl.constexpr, MODE: tl.constexpr, C: tl.constexpr,
                 PE: tl.constexpr, STEPS: tl.constexpr):
    n, q = tl.program_id(0), tl.program_id(1)
    r, a, b, o, x, y, on = _chunk_edges(q // NY, q % NY, X, Y, C, PE)
    t_at = ((n * X + x) * Y + y) * 4 + o * 2  # T[n, x, y, o, 0]
    # A[r, s]: edge r from edge s of the same chunk, the one down into r's node (slot 0, from the
    # node above) or the one right into it (slot 1, from the node to the left)
    from_up = tl.load(t_ptr + t_at, mask=on & (a > 0), other=0.0).to(ACC)
    from_left = tl.load(t_ptr + t_at + 1, mask=on & (b > 0), other=0.0).to(ACC)
    up_edge = ((a - 1) * C + b) * 2
    left_edge = (a * C + b - 1) * 2 + 1
    s = r[None, :]
    A = (tl.where(s == up_edge[:, None], from_up[:, None], 0.0)
         + tl.where(s == left_edge[:, None], from_left[:, None], 0.0))
    P = tl.where(r[:, None] == s, 1.0, 0.0).to(ACC) + A
    power = A
    for _ in tl.static_range(STEPS):  # P = (I + A)(I + A^2)...(I + A^2^STEPS)
        power = _mm(power, power, MODE)
        P = P + _mm(P, power, MODE)
    tl.store(p_ptr + ((n * tl.num_programs(1) + q) * PE + r[:, None]) * PE + s, P)


@tuned("PE", "BD")  # warps per program
@triton.jit
def _chunk_states(t_ptr, b_ptr, p_ptr, c_ptr, X, Y, NY, NQ, D, diagonal, first,
                  ACC: tl.constexpr, MODE: tl.constexpr, C: tl.constexpr, PE: tl.constexpr,
                  BD: tl.constexpr):
    n, I = tl.program_id(0), first + tl.program_id(1)
    J = diagonal - I
    r, a, b, o, x, y, on = _chunk_edges(I, J, X, Y, C, PE)
    dd = tl.program_id(2) * BD + tl.arange(0, BD)
    cols = (dd < D)[None, :]
    node = (n * X + x) * Y + y
    rhs = tl.load(b_ptr + (node * 2 + o)[:, None] * D + dd[None, :], mask=on[:, None] & cols,
                  other=0.0).to(ACC)
    # the border: the edge down from the node above, in the chunk above; the edge right from the
    # node to the left, in the chunk to the left (both solved by an earlier launch)
    top = on & (a == 0) & (x > 0)
    t_top = tl.load(t_ptr + node * 4 + o * 2, mask=top, other=0.0).to(ACC)
    c_top = tl.load(c_ptr + ((node - Y) * 2)[:, None] * D + dd[None, :], mask=top[:, None] & cols,
                    other=0.0)
    left = on & (b == 0) & (y > 0)
    t_left = tl.load(t_ptr + node * 4 + o * 2 + 1, mask=left, other=0.0).to(ACC)
    c_left = tl.load(c_ptr + ((node - 1) * 2 + 1)[:, None] * D + dd[None, :],
                     mask=left[:, None] & cols, other=0.0)
    rhs += t_top[:, None] * c_top + t_left[:, None] * c_left
    P = tl.load(p_ptr + ((n * NQ + I * NY + J) * PE + r[:, None]) * PE + r[None, :])
    tl.store(c_ptr + (node * 2 + o)[:, None] * D + dd[None, :], _mm(P, rhs, MODE),
             mask=on[:, None] & cols)


def _solve(T, b, c):
    """The forward: T [NB, X, Y, 2, 2], b [NB, X, Y, 2, D] (contiguous) -> C, in the kernels'
    float type (float32 for half precisions)."""
    NB, X, Y = T.shape[:3]
    D = b.shape[-1]
    nx, ny = triton.cdiv(X, c), triton.cdiv(Y, c)
    PE = triton.next_power_of_2(2 * c * c)
    BD = min(triton.next_power_of_2(D), 64)
    wide = _wide(b.dtype)
    steps = max(0, (2 * c - 2).bit_length() - 1)  # ceil(log2(2c - 1)) - 1: paths of 2c - 2 edges
    meta = dict(ACC=accumulator(b.dtype), C=c, PE=PE)
    P = torch.empty(NB, nx * ny, PE, PE, dtype=wide, device=b.device)
    _chunk_paths[(NB, nx * ny)](T, P, X, Y, ny, MODE=dot_mode(wide, PE), STEPS=steps, **meta)
    C = torch.zeros(NB, X, Y, 2, D, dtype=wide, device=b.device)
    for diagonal in range(nx + ny - 1):  # the wavefront over chunks
        first, last = max(0, diagonal - ny + 1), min(nx, diagonal + 1)
        _chunk_states[(NB, last - first, triton.cdiv(D, BD))](
            T, b, P, C, X, Y, ny, nx * ny, D, diagonal, first,
            MODE=dot_mode(wide, PE, BD), BD=BD, **meta)
    return C


class _GridSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, T, b, c):
        T, b = T.contiguous(), b.contiguous()
        C = _solve(T, b, c)
        ctx.save_for_backward(T, C)
        ctx.c, ctx.b_dtype = c, b.dtype
        return C.to(b.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, dC):
        T, C = ctx.saved_tensors
        dC = dC.to(C.dtype)
        pad = torch.nn.functional.pad
        # mu on the flipped grid: T transposed per node, b' = sum_o T[., o, i] dC[., o]
        into = torch.einsum("nxyoi,nxyod->nxyid", T.to(C.dtype), dC)
        mu = _solve(T.flip(1, 2).transpose(3, 4).contiguous(), into.flip(1, 2).contiguous(), ctx.c)
        mu = mu.flip(1, 2)
        # lambda[x, y, 0] = dC + mu[x+1, y, 0]; lambda[x, y, 1] = dC + mu[x, y+1, 1]
        lam = dC + torch.stack([pad(mu[:, 1:, :, 0], (0, 0, 0, 0, 0, 1)),
                                pad(mu[:, :, 1:, 1], (0, 0, 0, 1))], 3)
        # what node (x, y) read: C[x-1, y, 0] on slot 0, C[x, y-1, 1] on slot 1
        read = torch.stack([pad(C[:, :-1, :, 0], (0, 0, 0, 0, 1, 0)),
                            pad(C[:, :, :-1, 1], (0, 0, 1, 0))], 3)
        dT = torch.einsum("nxyod,nxyid->nxyoi", lam, read)
        return dT.to(T.dtype), lam.to(ctx.b_dtype), None


def grid_solve(T, b, chunk_size=4):
    """rcc.runtime.grid_chunk.solve by Triton kernels: T [NB, X, Y, 2 (out), 2 (in)], b
    [NB, X, Y, 2, D] -> every edge's state C [NB, X, Y, 2, D], with gradients. chunk_size is at
    most 8 (4 for float64, or in the interpreter)."""
    check([T, b], "grid_solve (backend 'triton', plan 'chunk')")
    c = int(chunk_size)
    limit = MAX_CHUNK if dot_mode(_wide(b.dtype), 16) else MAX_CHUNK_WITHOUT_DOT
    if not 1 <= c <= limit:
        where = "in Triton's interpreter" if interpreted() else f"in {b.dtype}"
        raise ValueError(f"backend 'triton' solves grids in chunks of 1 to {limit} nodes a side "
                         f"{where}; got chunk_size={chunk_size}")
    return _GridSolve.apply(T, b, c)
