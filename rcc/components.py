"""Block fns (components) and initial values computed from dims: the parts of elaboration that
LSRL-style programs need (LANGUAGE.md section 3, "Components").

A block fn `fn f(a) { state s = ...; s' = ...; EXPR }` (its value: the last line) is inlined
like an expression fn, but each use runs its statements with fresh copies of the states and
params it declares. The copies are named after the fn (`f_s`; the second use `f_2_s`), so they
appear in the module's final states and parameters under names the user can read and pass back.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import sympy

from . import ir
from . import syntax as S
from .errors import CompileError, Span


def declared_names(stmts) -> dict:
    """Name -> DeclItem of the states and params a block fn declares (in for loops too)."""
    out = {}
    for st in stmts:
        if isinstance(st, S.Decl):
            for item in st.items:
                out.setdefault(item.name, item)
        elif isinstance(st, S.For):
            for name, item in declared_names(st.body).items():
                out.setdefault(name, item)
    return out


def renamed(node, names: dict):
    """A copy of an AST (statements or an expression) with the names in `names` replaced:
    references, primes, declarations, update and assignment targets."""
    if isinstance(node, tuple):
        return tuple(renamed(x, names) for x in node)
    if isinstance(node, (S.Name, S.Primed)) and node.id in names:
        return dataclasses.replace(node, id=names[node.id])
    if isinstance(node, S.DeclItem) and node.name in names:
        return dataclasses.replace(node, name=names[node.name], init=renamed(node.init, names),
                                   shape=renamed(node.shape, names))
    if isinstance(node, S.Update) and node.state in names:
        return dataclasses.replace(node, state=names[node.state],
                                   value=renamed(node.value, names))
    if isinstance(node, S.Assign) and node.target in names:
        return dataclasses.replace(node, target=names[node.target],
                                   value=renamed(node.value, names))
    if dataclasses.is_dataclass(node) and not isinstance(node, (type, Span)):
        return dataclasses.replace(node, **{f.name: renamed(getattr(node, f.name), names)
                                            for f in dataclasses.fields(node)})
    return node


def instance_prefix(fn_name: str, uses: int, declared, taken) -> str:
    """The prefix of a block fn's `uses`-th copy: `f`, then `f_2`, `f_3`, ..., skipping any that
    would give one of the `declared` names a name already `taken`."""
    k = uses
    while True:
        prefix = fn_name if k == 1 else f"{fn_name}_{k}"
        if not any(f"{prefix}_{name}" in taken for name in declared):
            return prefix
        k += 1


def check_block_stmt(st, fn: S.FnDef):
    """What a block fn may not contain: inputs (pass them as arguments) and outputs (its value
    is its last line)."""
    if isinstance(st, S.Decl) and st.kind == "input":
        raise CompileError(f"fn '{fn.name}' cannot declare an input: pass the value as an "
                           "argument", st.span)
    if isinstance(st, S.Output):
        raise CompileError(f"fn '{fn.name}' cannot declare an output: its value is its last "
                           "line; declare the output in the cell", st.span)
    if isinstance(st, S.For):
        for inner in st.body:
            check_block_stmt(inner, fn)


_DIM_ONLY = ("const", "zeros", "ones", "eye")


def constant_elements(nodes, vid: int, shape, what: str, span: Span) -> tuple:
    """The elements (row-major, sympy expressions of dims) of node `vid`, a value computed from
    numbers and dims only: a state's initial value given by an expression."""
    from .passes.probe import Probe, flat

    cone = sorted(ir.cone(nodes, [vid]))
    for i in cone:
        n = nodes[i]
        if n.op in ("input", "state", "param", "pred", "slot"):
            kind = {"pred": "a predecessor's state", "slot": "an edge slot"}.get(n.op, n.op)
            raise CompileError(f"the initial value of {what} reads {kind} "
                               f"'{n.attr('name') or ''}'; it may use numbers and dims only "
                               "(to start from a learned value, name a param of the same shape)",
                               span)
        if not all(sympy.sympify(s).is_number for s in n.type.shape):
            raise CompileError(f"the initial value of {what} is computed from an expression, so "
                               f"its shape must be fixed numbers, not {list(n.type.shape)}", span)
    if not all(sympy.sympify(s).is_number for s in shape):
        raise CompileError(f"{what} starts from an expression, so its shape must be fixed "
                           f"numbers, not {list(shape)}", span)
    probe = Probe.__new__(Probe)  # the element-wise evaluator, dims kept as symbols
    probe.cell, probe.dims, probe.subs = None, {}, {}
    probe.values, probe.state_symbols = {}, {}
    for i in cone:
        probe.values[i] = probe._eval(nodes[i])
    value = np.broadcast_to(np.asarray(probe.values[vid], dtype=object),
                            tuple(int(s) for s in shape))
    elements = tuple(sympy.sympify(e) for e in flat(value))
    for e in elements:
        if e.is_number and not e.is_finite:
            raise CompileError(f"the initial value of {what} is not finite ({e})", span)
    return elements
