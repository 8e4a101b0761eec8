"""A cell's step as an LSRL program: affine forms over atoms.

The step is evaluated element by element at concrete dims, with the module's param values as
numbers. Every value is an affine form `sum(c_a * atom_a) + c0`; the atoms are what LSRL cannot
compute by a Linear layer: the inputs, ReLUs and products of two non-constant forms
(Multiplicative), and the states (`old`: the value before the step, `new`: after it). A cell that
uses anything else on a value that depends on the inputs (tanh, a comparison, a division by such
a value) is not an LSRL program, and the error points at that operation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy

from .. import ir
from ..errors import CompileError


@dataclass(frozen=True)
class Atom:
    kind: str  # input | old | new | relu | mul
    args: tuple = ()  # relu: (form,); mul: (form, form)
    name: str = ""  # input or state name
    index: int = 0  # the element, row-major
    span: object = None  # where to report it: the operation that made it (relu, mul), or the
    notes: tuple = ()  # fn call in the cell it came from, with a note at the operation


class Form:
    """sum(coef * atom) + const, atoms numbered in a Program."""
    __slots__ = ("prog", "terms", "const")

    def __init__(self, prog, terms, const=0.0):
        self.prog, self.terms, self.const = prog, terms, float(const)

    def key(self):
        return (tuple(sorted(self.terms.items())), self.const)

    def is_const(self):
        return not self.terms

    def _lift(self, other):
        return other if isinstance(other, Form) else Form(self.prog, {}, float(other))

    def __add__(self, other):
        other = self._lift(other)
        terms = dict(self.terms)
        for a, c in other.terms.items():
            terms[a] = terms.get(a, 0.0) + c
        return Form(self.prog, {a: c for a, c in terms.items() if c != 0.0},
                    self.const + other.const)

    __radd__ = __add__

    def __neg__(self):
        return Form(self.prog, {a: -c for a, c in self.terms.items()}, -self.const)

    def __sub__(self, other):
        return self + (-self._lift(other))

    def __rsub__(self, other):
        return self._lift(other) - self

    def scale(self, k):
        k = float(k)
        if k == 0.0:
            return Form(self.prog, {}, 0.0)
        return Form(self.prog, {a: c * k for a, c in self.terms.items()}, self.const * k)

    def __mul__(self, other):
        other = self._lift(other)
        if other.is_const():
            return self.scale(other.const)
        if self.is_const():
            return other.scale(self.const)
        return self.prog.atom_form("mul", (self, other))

    __rmul__ = __mul__


@dataclass
class Program:
    """The atoms, and the forms of the states' updates and of the outputs (flat, row-major)."""
    name: str
    inputs: list = field(default_factory=list)  # (name, shape)
    states: list = field(default_factory=list)  # (name, shape, initial values [n])
    updates: dict = field(default_factory=dict)  # state name -> [Form] (the new value)
    outputs: list = field(default_factory=list)  # (name, shape, [Form])
    atoms: list = field(default_factory=list)
    index: dict = field(default_factory=dict)  # atom key -> id
    span: object = None  # of the operation being evaluated, for atoms and errors
    notes: tuple = ()  # with span: where in an fn the operation is
    state_spans: dict = field(default_factory=dict)  # state name -> (span, notes) of its update

    def where_state(self, name) -> tuple:
        """(span, notes) to report the update of state `name` at."""
        return self.state_spans.get(name, (self.span, ()))

    def atom(self, kind, args=(), name="", index=0) -> int:
        key = (kind, name, index, tuple(a.key() for a in args))
        if key not in self.index:
            self.index[key] = len(self.atoms)
            self.atoms.append(Atom(kind, args, name, index, self.span, self.notes))
        return self.index[key]

    def atom_form(self, kind, args=(), name="", index=0) -> Form:
        return Form(self, {self.atom(kind, args, name, index): 1.0})


def _relu(f: Form) -> Form:
    if f.is_const():
        return Form(f.prog, {}, max(f.const, 0.0))
    return f.prog.atom_form("relu", (f,))


_NUMERIC_UNARY = {
    "neg": lambda a: -a, "sigmoid": lambda a: 1 / (1 + math.exp(-a)) if a > -700 else 0.0,
    "tanh": math.tanh, "relu": lambda a: max(a, 0.0), "silu": lambda a: a / (1 + math.exp(-a))
    if a > -700 else 0.0, "gelu": lambda a: a * (1 + math.erf(a / math.sqrt(2))) / 2,
    "exp": math.exp, "log": math.log, "log1p": math.log1p, "expm1": math.expm1,
    "softplus": lambda a: max(a, 0.0) + math.log1p(math.exp(-abs(a))),
    "logsigmoid": lambda a: min(a, 0.0) - math.log1p(math.exp(-abs(a))), "sqrt": math.sqrt,
    "rsqrt": lambda a: 1 / math.sqrt(a), "abs": abs, "sign": lambda a: float(np.sign(a)),
    "sin": math.sin, "cos": math.cos,
}
_NUMERIC_BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "maximum": max, "minimum": min,
    "logaddexp": lambda a, b: max(a, b) + math.log1p(math.exp(-abs(a - b))),
    "lt": lambda a, b: float(a < b), "le": lambda a, b: float(a <= b),
    "gt": lambda a, b: float(a > b), "ge": lambda a, b: float(a >= b),
    "eq": lambda a, b: float(a == b), "ne": lambda a, b: float(a != b),
}
# exact ReLU forms of piecewise-linear ops (the paper's constructions)
_PIECEWISE = {
    "relu": lambda a: _relu(a),
    "abs": lambda a: _relu(a) + _relu(-a),
}
_PIECEWISE_BINARY = {
    "maximum": lambda a, b: a + _relu(b - a),
    "minimum": lambda a, b: a - _relu(a - b),
}
_SUGGEST = {
    "lt": "f_smaller", "le": "f_smaller", "gt": "f_larger", "ge": "f_larger", "eq": "f_eq",
    "ne": "f_neq", "where": "f_ifelse_mul", "sign": "f_step",
}


def _const(v):
    return isinstance(v, (int, float, np.floating, np.integer)) or (
        isinstance(v, Form) and v.is_const())


def _num(v) -> float:
    return v.const if isinstance(v, Form) else float(v)


class Extractor:
    def __init__(self, cell: ir.CellIR, dims: dict, params: dict):
        self.cell, self.params, self.dims = cell, params, dims
        self.subs = {ir.dim_symbol(k): v for k, v in dims.items()}
        self.prog = Program(cell.name, span=cell.span)
        self.values: dict = {}

    def run(self) -> Program:
        c, prog = self.cell, self.prog
        for d in c.inputs:
            prog.inputs.append((d.name, self._shape(d.shape)))
        updated = {}
        for s, v in c.updates:
            updated.setdefault(v, []).append(s)
        # only what the updates and outputs read: an unused value may be anything
        live = ir.cone(c.nodes, [v for _, v in c.updates] + [v for _, v, _ in c.outputs])
        for n in c.nodes:
            if n.id not in live:
                continue
            prog.span, prog.notes = c.located(n.id)
            self.values[n.id] = self._eval(n)
            for s in updated.get(n.id, ()):
                prog.state_spans[s] = (prog.span, prog.notes)
                shape = self._shape(next(d.shape for d in c.states if d.name == s))
                value = np.broadcast_to(np.asarray(self.values[n.id], dtype=object), shape)
                prog.updates[s] = [self._form(x) for x in value.reshape(-1)]
                if n.op not in ("input", "state", "param", "const"):
                    # later reads of s' are reads of the LinState's output
                    self.values[n.id] = self._atoms("new", s, shape)
        for d in c.states:
            shape = self._shape(d.shape)
            prog.states.append((d.name, shape, self._initial(d, shape)))
            if d.name not in prog.updates:  # kept: s' = s
                prog.updates[d.name] = list(self._atoms("old", d.name, shape).reshape(-1))
        for name, v, _ in c.outputs:
            shape = tuple(self._shape(c.node(v).type.shape))
            value = np.asarray(self.values[v], dtype=object).reshape(-1)
            prog.outputs.append((name, shape, [self._form(x) for x in value]))
        return prog

    def _initial(self, d: ir.Decl, shape) -> np.ndarray:
        init = d.init
        if init.kind == "param":
            return np.asarray(self.params[init.param], dtype=np.float64).reshape(shape)
        if init.kind == "eye":
            return np.eye(*shape)
        value = {"zeros": [0.0], "ones": [1.0]}.get(init.kind) or [
            float(sympy.sympify(a).subs(self.subs)) for a in init.args]
        return np.broadcast_to(np.asarray(value, dtype=np.float64).reshape(
            shape if len(value) > 1 else ()), shape).copy()

    def _shape(self, shape) -> tuple:
        return tuple(int(sympy.sympify(s).subs(self.subs)) for s in shape)

    def _form(self, x) -> Form:
        return x if isinstance(x, Form) else Form(self.prog, {}, float(x))

    def _atoms(self, kind, name, shape):
        out = np.empty(shape, dtype=object)
        for k, idx in enumerate(np.ndindex(*shape)):
            out[idx] = self.prog.atom_form(kind, (), name, k)
        return out

    def _refuse(self, n, what):
        raise CompileError(f"{what} is not an LSRL primitive: on a value that depends on the "
                           "inputs, an LSRL program may use affine maps, relu (and max, min, abs), "
                           "products of two values, and states updated affinely"
                           + (f"; `use lsrl` has {_SUGGEST[n.op]}" if n.op in _SUGGEST else ""),
                           self.prog.span, self.prog.notes)

    def _eval(self, n: ir.Node):
        from ..passes.probe import Probe

        v = [self.values[a] for a in n.args]
        op = n.op
        if op == "input":
            return self._atoms("input", n.attr("name"), self._shape(n.type.shape))
        if op == "state":
            return self._atoms("old", n.attr("name"), self._shape(n.type.shape))
        if op == "param":
            return np.asarray(self.params[n.attr("name")], dtype=np.float64).astype(object)
        if op == "const":
            return np.asarray(float(sympy.sympify(n.attr("value")).subs(self.subs)), dtype=object)
        if op in _NUMERIC_UNARY:
            return _map(lambda a: self._unary(n, a), v[0])
        if op in _NUMERIC_BINARY:
            return _map(lambda a, b: self._binary(n, a, b), v[0], v[1])
        if op == "where":
            return _map(lambda c, a, b: (a if _num(c) else b) if _const(c)
                        else self._refuse(n, "where() with a condition that depends on the inputs"),
                        *v)
        if op in ("sum", "mean"):
            return _reduce(v[0], n.attr("axis"), op == "mean")
        if op in ("amax", "logsumexp", "softmax"):
            if all(_const(x) for x in np.asarray(v[0], dtype=object).reshape(-1)):
                return _numeric_reduce(op, v[0], n.attr("axis"))
            self._refuse(n, f"{op}()")
        if op == "outer":
            return np.multiply.outer(np.asarray(v[0], dtype=object), np.asarray(v[1], dtype=object))
        # structure only (matmul, concat, stack, getitem, transpose, eye, zeros, ones): the
        # probe's element-wise evaluation, on forms and numbers
        probe = Probe.evaluator(self.subs)
        probe.values.update((a, self.values[a]) for a in n.args)
        out = probe.evaluate(n)
        if op in ("eye", "zeros", "ones"):
            out = np.vectorize(float, otypes=[object])(out) if np.asarray(out).size else out
        return out

    def _unary(self, n, a):
        if _const(a):
            return _NUMERIC_UNARY[n.op](_num(a))
        if n.op == "neg":
            return -a
        if n.op in _PIECEWISE:
            return _PIECEWISE[n.op](a)
        self._refuse(n, f"{n.op}()")

    def _binary(self, n, a, b):
        op = n.op
        if _const(a) and _const(b):
            return _NUMERIC_BINARY[op](_num(a), _num(b))
        fa, fb = self._form(a), self._form(b)
        if op == "add":
            return fa + fb
        if op == "sub":
            return fa - fb
        if op == "mul":
            return fa * fb
        if op == "div" and _const(b):
            return fa.scale(1.0 / _num(b))
        if op == "pow" and _const(b) and float(_num(b)).is_integer() and 0 <= _num(b) <= 8:
            out = Form(self.prog, {}, 1.0)
            for _ in range(int(_num(b))):
                out = out * fa
            return out
        if op in _PIECEWISE_BINARY:
            return _PIECEWISE_BINARY[op](fa, fb)
        what = {"div": "a division by a value that depends on the inputs",
                "pow": "a power other than a small integer one"}.get(op, f"{op}()")
        self._refuse(n, what)


def _map(f, *arrays):
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=object) for a in arrays])
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = f(*(a[idx] for a in arrays))
    return out


def _reduce(arr, axis, mean):
    arr = np.asarray(arr, dtype=object)
    axes = tuple(range(arr.ndim)) if axis is None else (axis,)
    count = int(np.prod([arr.shape[a] for a in axes])) if axes else 1
    total = np.sum(arr, axis=axes) if arr.ndim else arr
    return _map(lambda x: x * (1.0 / count), total) if mean else np.asarray(total, dtype=object)


def _numeric_reduce(op, arr, axis):
    import torch

    t = torch.tensor(np.vectorize(_num)(np.asarray(arr, dtype=object)).astype(np.float64))
    dim = tuple(range(t.ndim)) if axis is None else axis
    if op == "softmax":
        out = torch.softmax(t, dim=axis)
    else:
        out = {"amax": torch.amax, "logsumexp": torch.logsumexp}[op](t, dim=dim)
    return out.numpy().astype(object)


def extract(cell: ir.CellIR, dims: dict, params: dict) -> Program:
    """The LSRL program of `cell` at `dims`, its params taken as numbers (name -> array)."""
    if cell.topology != "seq":
        raise CompileError(f"cell '{cell.name}' runs over {cell.topology}; LSRL programs run "
                           "over sequences (over seq)", cell.span)
    return Extractor(cell, dims, params).run()
