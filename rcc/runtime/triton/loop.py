"""Running a generated module's loop-over-time kernels (backend triton, plan sequential), with
gradients.

A generated module holds its kernels as Python code (`@triton.jit` functions printed by
backends/triton/kernel.py) and `*_meta(dims)`, their constexprs. `run` launches the forward
kernel, one program per row (batch x head), and wraps it in an autograd.Function whose backward
launches the backward kernel.
"""
from __future__ import annotations

import torch
import triton

from ..layout import check_built_for, rows
from .common import accumulator, check, output_grads, save_loop, strided


def value_block(extent: int) -> int:
    """Columns of the split axis per program: 32, fewer for a smaller axis."""
    return min(triton.next_power_of_2(extent), 32)


def columns(meta, split):
    """The constexprs with the split axis' tile set to a block of it, and the number of blocks."""
    if split is None:
        return meta, 1
    k = split["extent"]
    block = value_block(meta[f"E{k}"])
    return dict(meta, **{f"P{k}": block}), -(-meta[f"E{k}"] // block)


def run(kernels, meta: dict, T: int, N: int, seq, consts, states, out_shapes, built_for, split=None):
    """The loop over time. kernels: (forward, backward) Triton kernels; meta: their constexprs;
    seq: tensors [N, T, *shape] (inner axes contiguous or not); consts: tensors; states:
    initial states [N, *shape]; out_shapes: each output's declared shape; split: the axis the
    programs of a row split (TileKernelPrinter.split_spec), or None. Returns (outputs
    [N, T, *shape], final states [N, *shape]), differentiable by every tensor."""
    tensors = (*seq, *consts, *states)
    check(tensors)
    check_built_for("backend 'triton'", N * T, N, tensors, built_for)
    meta, blocks = columns(meta, split)
    spec = (kernels, meta, T, N, len(seq), len(consts), out_shapes, split, blocks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        results = _Loop.apply(spec, *tensors)
    else:
        results = _forward(spec, tensors, save=False)[0]
    n_out = len(out_shapes)
    return list(results[:n_out]), list(results[n_out:])


def _forward(spec, tensors, save):
    (forward, _), meta, T, N, n_seq, n_const, out_shapes, _, blocks = spec
    dtype, device = tensors[0].dtype, tensors[0].device
    seq = [rows(x, 2) for x in tensors[:n_seq]]
    consts = [c.contiguous() for c in tensors[n_seq:n_seq + n_const]]
    states = [rows(s, 1).contiguous() for s in tensors[n_seq + n_const:]]
    outs = [torch.empty(N, T, *shape, dtype=dtype, device=device) for shape in out_shapes]
    finals = [torch.empty_like(s) for s in states]
    saved = [torch.empty(T, *s.shape, dtype=dtype, device=device) if save else f
             for s, f in zip(states, finals)]  # the finals stand in when nothing is saved
    if T > 0:
        forward[(N, blocks)](*strided(seq), *consts, *states, *outs, *finals, *saved, T, N,
                      SAVE=save, ACC=accumulator(dtype), **meta)
    else:
        for f, s in zip(finals, states):
            f.copy_(s)
    finals = [f.view(s.shape) for f, s in zip(finals, tensors[n_seq + n_const:])]
    return (*outs, *finals), (seq, consts, states, saved)


class _Loop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *tensors):
        return save_loop(ctx, _forward, spec, tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 (raises if one was modified in place since forward)
        (_, backward), meta, T, N, n_seq, n_const, out_shapes, split, blocks = ctx.spec
        whole = split or {"seq": [False] * n_seq, "const": [False] * n_const,
                          "states": [False] * len(ctx.kept[2])}
        parts = lambda w: blocks if w else 1  # noqa: E731 (a part of the adjoint per program)
        seq, consts, states, saved = ctx.kept
        first = (states + seq + consts)[0]  # a cell may read no input, or keep no state
        dtype, device = first.dtype, first.device
        n_out = len(out_shapes)
        gouts = output_grads(grads[:n_out], out_shapes, N, T, dtype, device)
        gfinals = [torch.zeros_like(s) if g is None else rows(g, 1).contiguous()
                   for g, s in zip(grads[n_out:], states)]
        gseq = [torch.zeros(parts(w), T, N, x.shape[2], dtype=dtype, device=device)
                for x, w in zip(seq, whole["seq"])]
        gconst = [torch.zeros(parts(w), N, c.numel(), dtype=dtype, device=device)
                  for c, w in zip(consts, whole["const"])]
        ginit = [torch.empty(parts(w), *s.shape, dtype=s.dtype, device=device)
                 for s, w in zip(states, whole["states"])]
        if T > 0:
            backward[(N, blocks)](*strided(seq), *consts, *saved, *gouts, *gfinals, *gseq, *gconst,
                           *ginit, T, N, ACC=accumulator(dtype), **meta)
        else:
            for g, f in zip(ginit, gfinals):
                g.zero_()
                g[0].copy_(f)
        gseq, gconst, ginit = ([g.sum(0) for g in x] for x in (gseq, gconst, ginit))
        grads_in = [g.transpose(0, 1).reshape(s) for g, s in zip(gseq, ctx.shapes[:n_seq])]
        grads_in += [g.sum(0).view(s) for g, s in zip(gconst, ctx.shapes[n_seq:n_seq + n_const])]
        grads_in += [g.view(s) for g, s in zip(ginit, ctx.shapes[n_seq + n_const:])]
        return (None, *grads_in)


def over_rows(kernel, meta: dict, inputs, n_out: int):
    """A generated kernel over independent rows (plan newton's Jacobian): inputs are the states
    [R, *shape] then what the step reads (per-row values [R, ...] or params); returns n_out
    tensors [R, *shape]. Not differentiable (Newton's iterations are not differentiated)."""
    inputs = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in inputs]
    check(inputs)
    first = inputs[0]
    outs = [torch.empty_like(first, memory_format=torch.contiguous_format) for _ in range(n_out)]
    if first.shape[0] > 0:
        kernel[(first.shape[0],)](*[x.contiguous() for x in inputs], *outs,
                                  ACC=accumulator(first.dtype), **meta)
    return outs
