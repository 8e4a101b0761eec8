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
from .shapes import fmt_shape, same_dim


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
    probe = Probe.evaluator()  # dims kept as symbols
    for i in cone:
        probe.values[i] = probe.evaluate(nodes[i])
    value = np.broadcast_to(np.asarray(probe.values[vid], dtype=object),
                            tuple(int(s) for s in shape))
    elements = tuple(sympy.sympify(e) for e in flat(value))
    for e in elements:
        if e.is_number and not e.is_finite:
            raise CompileError(f"the initial value of {what} is not finite ({e})", span)
    return elements


class ComponentElaboration:
    """Mixed into rcc.elaborate.Elaborator: calls of fns with defaults and names, block fns, and
    initial values computed from dims. Needs the Elaborator's env, decls, dims, scopes,
    inline_stack, caller_env, block_names, fn_uses and its statement and expression methods."""

    def _initial_values(self, item, shape, vid, where) -> ir.Init:
        """`state c[2] = stack(cos(a), sin(a))`: a tensor computed from numbers and dims."""
        got = self.shape(vid)
        if len(got) > len(shape) or not all(same_dim(g, s) or g == 1
                                             for g, s in zip(got[::-1], shape[::-1])):
            raise CompileError(f"shape mismatch: state '{item.name}' is {fmt_shape(shape)} but "
                               f"its initial value is {fmt_shape(got)}", where)
        from .elaborate import _fits_float32

        values = constant_elements(self.nodes, vid, shape, f"state '{item.name}'", where)
        _fits_float32("the initial value", values, where)
        if all(v == 0 for v in values):
            return ir.Init("zeros")
        return ir.Init("values", values)

    def _fn_arguments(self, e: S.Call, fn: S.FnDef) -> dict:
        """Parameter name -> argument expression of a call, by position then by keyword; the
        parameters left out must have defaults."""
        here = ((f"'{fn.name}' is defined here", fn.span),)
        defaults = fn.defaults or (None,) * len(fn.params)
        required = sum(1 for d in defaults if d is None)
        if len(e.args) > len(fn.params):
            want = str(len(fn.params)) if required == len(fn.params) else \
                f"{required} to {len(fn.params)}"
            raise CompileError(f"fn '{e.func}' takes {want} argument"
                               f"{'s' if want != '1' else ''}, got {len(e.args)}", e.span,
                               notes=here)
        given = dict(zip(fn.params, e.args))
        for name, value in e.kwargs:
            if name not in fn.params:
                raise CompileError(f"fn '{e.func}' has no parameter '{name}' (its parameters: "
                                   f"{', '.join(fn.params) or 'none'})", value.span, notes=here)
            if name in given:
                raise CompileError(f"fn '{e.func}' gets parameter '{name}' twice", value.span,
                                   notes=here)
            given[name] = value
        missing = [p for p, d in zip(fn.params, defaults) if p not in given and d is None]
        if missing:
            if not e.kwargs and required == len(fn.params):
                raise CompileError(f"fn '{e.func}' takes {len(fn.params)} argument"
                                   f"{'s' if len(fn.params) != 1 else ''}, got {len(e.args)}",
                                   e.span, notes=here)
            raise CompileError(f"fn '{e.func}' needs parameter{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(repr(m) for m in missing)}", e.span, notes=here)
        return given

    def _run_block(self, fn: S.FnDef):
        """A block fn's statements, with fresh copies of the states and params it declares,
        then its value, the last line (self.env already holds its parameters)."""
        declared = declared_names(fn.stmts)
        for name, item in declared.items():
            if name in fn.params:
                raise CompileError(f"'{name}' is a parameter of fn '{fn.name}'; a state or "
                                   "param it declares needs another name", item.span)
        if declared and self.scopes:
            raise CompileError(f"fn '{fn.name}' declares states or params, so it cannot be "
                               "used inside a predecessor form (one copy per edge)",
                               self.inline_stack[-1][1])
        for st in fn.stmts:
            check_block_stmt(st, fn)
        self.fn_uses[fn.name] = self.fn_uses.get(fn.name, 0) + 1
        taken = set(self.decls) | set(self.dims) | set(self.env) | self.caller_env
        prefix = instance_prefix(fn.name, self.fn_uses[fn.name], declared, taken)
        names = {name: f"{prefix}_{name}" for name in declared}
        self.block_names.append(set(names.values()))
        try:
            self.block(renamed(fn.stmts, names))
            return self.eval_any(renamed(fn.body, names))
        finally:
            self.block_names.pop()
