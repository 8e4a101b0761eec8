"""The axis a step never mixes, along which the per-row loop (kernel.py) splits over programs.

A matrix state S[K, V] whose step reads it through `q @ S`, `k @ S` (contracting K) and
elementwise ops never combines two of its columns: column j of the next state, and of every
value of the step that has a V axis, depends on column j alone. The step then runs as programs
that each own a block of columns, as flash-linear-attention's fused-recurrent kernels do for GLA
and the delta rule; values without a V axis (q, k, gates, a normaliser n[K]) are computed by
every program. This reads the axis off the IR: an extent E of a state's axis such that no op of
the step contracts, reduces, indexes, concatenates or builds an identity along an axis of extent
E, and no value has an axis whose extent depends on E otherwise (a slice V - 1, a concat 2 V).

The adjoint of a value without the axis is, in each program, its part of a sum over columns:
such adjoints only ever feed other such adjoints linearly (an adjoint with the axis would need a
reduction over it, which the rule excludes), so the runtime sums the programs' parts.
"""
from __future__ import annotations

import sympy

from rcc import ir

REDUCTIONS = ("sum", "mean", "amax", "logsumexp", "softmax")


def value_split(cell: ir.CellIR, part):
    """The extent to split (a sympy expression), or None."""
    if cell.topology != "seq":
        return None
    candidates = []
    for s in cell.states:
        for e in reversed(s.shape):  # the last axis first: the value axis of [K, V] states
            e = sympy.sympify(e)
            if e.free_symbols and e not in candidates:
                candidates.append(e)
    step = set(part.step)
    ids = step | set(part.seq) | set(part.const) | set(part.state_node.values())
    ids |= {i for _, i in cell.updates} | {i for _, i, _ in cell.outputs}
    for E in candidates:
        if all(_keeps(cell, cell.node(i), E, i in step) for i in sorted(ids)):
            return E
    return None


def _keeps(cell, n, E, in_step) -> bool:
    """Whether node n keeps columns of extent E apart (its op, when the kernel computes it)."""
    same = lambda x: sympy.expand(sympy.sympify(x) - E) == 0  # noqa: E731
    for x in n.type.shape:  # a slice V - 1 or a concat 2 V would move columns
        x = sympy.sympify(x)
        if not same(x) and x.free_symbols & E.free_symbols:
            return False
    if not in_step:
        return True
    args = [cell.node(a) for a in n.args]
    if n.op == "matmul":
        return not same(args[0].type.shape[-1])
    if n.op in REDUCTIONS:
        src, axis = args[0].type.shape, n.attr("axis")
        if axis is None and n.op != "softmax":
            return not any(same(x) for x in src)
        axis = len(src) - 1 if axis is None else axis
        return not (src and same(src[axis]))
    if n.op == "getitem":
        shape, axis = list(args[0].type.shape), 0
        for entry in n.attr("index"):
            if entry[0] == "new":
                continue
            if same(shape[axis]) and not (entry[0] == "slice" and sympy.sympify(entry[1]) == 0
                                          and same(entry[2])):
                return False
            axis += 1
        return True
    if n.op == "eye":
        return not any(same(x) for x in n.type.shape)
    return True
