"""Running a generated loop over time tiled over hidden units (backends/triton/units.py), with
gradients.

Tiles: BB rows by HB units per program, BK the contraction block of the recurrent products; the
grid is (U, NB) = (cdiv(D, HB), cdiv(N, BB)). How the steps are launched:
- one program of units per block of rows (U = 1): one launch runs every step;
- on a GPU, when the grid fits on the device at once: one launch, the programs sharing rows
  meeting at a barrier each step (every program must be resident, or the barrier never opens);
- otherwise (Triton's interpreter runs programs one after another; a grid larger than the GPU):
  one launch per step.
The states' history (every step's states, or two slots when nothing is saved) and the products
are kept in the accumulator's precision (float32 for half types), so the launch mode never
changes a result.
"""
from __future__ import annotations

import torch

from ..layout import check_built_for, rows
from .common import accumulator, check, dot_type, interpreted, output_grads, save_loop, strided

_I32 = 2 ** 31


def blocks(N: int, D: int, sms, matrices: int = 1) -> dict:
    """Tile sizes and warps for N rows of D units, and whether the programs meet at a barrier
    (SYNC) or are launched one step at a time (STEPWISE). sms: the GPU's multiprocessors (None:
    no barrier, as in the interpreter); matrices: how many recurrent matrices the step reads.

    16 rows by 16 or 32 units, 8 warps; the forward's products over blocks of BK = 64 (32 for a
    step of several recurrent matrices, sLSTM's four, which holds more tiles live), the
    backward's over blocks of BK_BACK = 128; no software pipelining (num_stages=1: Triton's
    asynchronous copies gave stale reads after the barrier on an H200; the kernels prefetch one
    block ahead themselves). Compiled for sm_90, every stdlib kernel fits in registers at these
    sizes (larger blocks spill; benchmarks/gpu_compile.py). On an H200 (LSTM, bf16, B=16, d=1024),
    BK = 64 / BK_BACK = 128 took 13% off the forward and 10% off forward + backward against
    32 / 64. The tiles do not depend on D beyond D <= 32: one compiled kernel serves every
    hidden size."""
    NB = -(-N // 16)
    tiles = dict(BB=16, BK=64 if matrices <= 1 else 32, BK_BACK=128, SYNC=False, STEPWISE=False,
                 num_stages=1, num_warps=8)
    if D <= 32:  # one program holds every unit: no barrier
        HB = 16 if D <= 16 else 32
    else:
        HB = next((hb for hb in (16, 32) if sms is not None and -(-D // hb) * NB <= sms), None)
        tiles.update(SYNC=HB is not None, STEPWISE=HB is None)
        HB = HB or 32
    return dict(tiles, HB=HB)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run(kernels, spec: dict, meta: dict, T: int, N: int, seq, consts, states, out_shapes, built_for):
    """The loop over time (the arguments of rcc.runtime.triton.run, plus `spec`: the kernels'
    layout, UnitKernelPrinter.spec). Returns (outputs [N, T, ...], final states [N, ...])."""
    tensors = (*seq, *consts, *states)
    check(tensors)
    check_built_for("backend 'triton'", N * T, N, tensors, built_for)
    D = meta["D"]
    widths = [max(m, 1) * D for m in spec["seq"]] + [p[3] * D for p in spec["products"]]
    if (T + 1) * max(N, 1) * max(widths + [D]) >= _I32:
        raise ValueError(f"backend 'triton': {T} steps of {N} rows of {max(widths + [D])} entries index "
                         "past 2**31 elements; run the sequence in shorter pieces (carry the final states)")
    args = (kernels, spec, meta, T, N, len(seq), len(consts), out_shapes)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        results = _Units.apply(args, *tensors)
    else:
        results = _forward(args, tensors, save=False)[0]
    n_out = len(out_shapes)
    return list(results[:n_out]), list(results[n_out:])


def _launch(kernel, grid, tiles, steps, args, first, ints, backward=False, **flags):
    """The steps: one launch (U = 1, or a barrier), or one per step. Forward from step `first`,
    or (`backward`) back from it; the backward's last launch also finishes the first step."""
    sizes = dict(**{k: tiles[k] for k in ("BB", "HB", "SYNC", "num_warps", "num_stages")}, **flags,
                 BK=tiles["BK_BACK" if backward else "BK"])
    finish = (True,) if backward else ()
    if not tiles["STEPWISE"]:
        kernel[grid](*args(), first, steps, *finish, *ints, **sizes)
        return
    for s in range(steps):
        t = first - s if backward else first + s
        kernel[grid](*args(), t, 1, *((False,) if backward else ()), *ints, **sizes)
    if backward:  # the products' part of the first step's adjoint, once every step's is stored
        kernel[grid](*args(), first - steps, 0, True, *ints, **sizes)


def _forward(args, tensors, save):
    (forward, _), spec, meta, T, N, n_seq, n_const, out_shapes = args
    dtype, device = tensors[0].dtype, tensors[0].device
    acc, D = _acc(dtype), meta["D"]
    seq = [rows(x, 2) for x in tensors[:n_seq]]
    consts = [c.contiguous() for c in tensors[n_seq:n_seq + n_const]]
    states = tensors[n_seq + n_const:]
    slots = T + 1 if save else 2
    hist = [torch.empty(slots, N, D, dtype=acc, device=device) for _ in states]
    for h, s in zip(hist, states):
        h[0] = rows(s, 1)
    outs = [torch.empty(N, T, *shape, dtype=dtype, device=device) for shape in out_shapes]
    zs = [torch.empty(T if save else 1, N, m * D, dtype=acc, device=device)
          for _, _, _, m in spec["products"]]
    sms = None if device.type != "cuda" or interpreted() else \
        torch.cuda.get_device_properties(device).multi_processor_count
    tiles = blocks(N, D, sms, len({p[0] for p in spec["products"]}))
    grid = (-(-D // tiles["HB"]), -(-N // tiles["BB"]))
    sync = torch.zeros(grid[1], dtype=torch.int32, device=device)
    if T > 0 and N > 0:
        consts_meta = {k: v for k, v in meta.items() if k != "D"}
        _launch(forward, grid, tiles, T, lambda: (*strided(seq), *consts, *hist, *outs, *zs, sync), 0,
                (slots, T, N, D), SAVE=save, ACC=accumulator(dtype), DOT=dot_type(dtype), **consts_meta)
    finals = [h[T % slots].to(dtype).view(s.shape) for h, s in zip(hist, states)]
    return (*outs, *finals), (seq, consts, hist, zs, slots, tiles, grid, dtype)


class _Units(torch.autograd.Function):
    @staticmethod
    def forward(ctx, args, *tensors):
        return save_loop(ctx, _forward, args, tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 (raises if one was modified in place since forward)
        (_, backward), spec, meta, T, N, n_seq, n_const, out_shapes = ctx.spec
        seq, consts, hist, zs, slots, tiles, grid, dtype = ctx.kept
        device = hist[0].device
        acc, D = hist[0].dtype, meta["D"]
        n_out = len(out_shapes)
        gouts = output_grads(grads[:n_out], out_shapes, N, T, dtype, device)
        ladj = [torch.zeros(N, D, dtype=acc, device=device) if g is None else rows(g, 1).to(acc).clone()
                for g in grads[n_out:]]
        gz = [torch.empty(T, N, m * D, dtype=acc, device=device) for _, _, _, m in spec["products"]]
        U = grid[0]
        dseq = [torch.zeros(T, N, m * D, dtype=acc, device=device) if m else
                torch.zeros(U, T, N, dtype=acc, device=device) for m in spec["seq"]]
        dconst = [torch.zeros(grid[1], m * D if m else U, dtype=acc, device=device)
                  for m, d in zip(spec["const"], spec["diff_const"]) if d]
        sync = torch.zeros(grid[1], dtype=torch.int32, device=device)
        if T > 0 and N > 0:
            consts_meta = {k: v for k, v in meta.items() if k != "D"}
            _launch(backward, grid, tiles, T, lambda: (*strided(seq), *consts, *hist, *zs, *gouts, *ladj,
                                                       *gz, *dseq, *dconst, sync),
                    T - 1, (slots, T, N, D), backward=True, ACC=accumulator(dtype), DOT=dot_type(dtype),
                    **consts_meta)
        shapes = ctx.shapes
        grads_in = []
        for d, m, s in zip(dseq, spec["seq"], shapes[:n_seq]):
            d = d.transpose(0, 1) if m else d.sum(0).transpose(0, 1)
            grads_in.append(d.reshape(s).to(dtype))
        it = iter(dconst)
        for k, (m, s) in enumerate(zip(spec["const"], shapes[n_seq:n_seq + n_const])):
            if m is None:  # a recurrent matrix: one GEMM over every step and row
                total = None
                for (mat, st, transposed, pm), g in zip(spec["products"], gz):
                    if mat != k:
                        continue
                    h = hist[st][:T].reshape(T * N, D)
                    g2 = g.reshape(T * N, pm * D)
                    part = h.t() @ g2 if transposed else g2.t() @ h
                    total = part if total is None else total + part
                grads_in.append(None if total is None else total.reshape(s).to(dtype))
            elif spec["diff_const"][k]:
                partial = next(it)  # [row blocks, ...]: this program's part of the sum
                grads_in.append((partial.sum(0) if m else partial.sum()).reshape(s).to(dtype))
            else:
                grads_in.append(None)
        grads_in += [g.view(s).to(dtype) for g, s in zip(ladj, shapes[n_seq + n_const:])]
        return (None, *grads_in)
