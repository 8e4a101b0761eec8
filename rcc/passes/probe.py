"""Evaluate a CellIR element by element in sympy, at small concrete "probe" dims.

Every element of every input, param and state becomes a sympy symbol; each node becomes a NumPy
object array of sympy expressions. Differentiating the state updates by the state symbols gives
the cell's exact step Jacobian, from which the analysis reads linearity and structure.
"""
from __future__ import annotations

import itertools

import numpy as np
import sympy

from .. import ir


class NoGrad(sympy.Function):
    """A comparison result (0/1): constant almost everywhere, so its derivative is zero. At
    numbers it evaluates (rcc.passes.verify compares forms at random points)."""

    holds = None  # the comparison on floats (not `compare`: sympy.Basic has that method)

    @classmethod
    def eval(cls, a, b):
        if a.is_Number and b.is_Number:
            return sympy.Integer(int(cls.holds(float(a), float(b))))
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


_COMPARE = {"lt": float.__lt__, "le": float.__le__, "gt": float.__gt__, "ge": float.__ge__,
            "eq": float.__eq__, "ne": float.__ne__}


def _cmp(name):
    return type(f"cmp_{name}", (NoGrad,), {"holds": staticmethod(_COMPARE[name])})


_CMP = {op: _cmp(op) for op in ir.COMPARE}


class Amax(sympy.Function):
    """The largest of its arguments, kept opaque: sympy's Max compares every pair of its
    arguments when built (quadratic, with a solver call each) and its derivative is slower still,
    so amax over a [64, 64] value took minutes. d/dx_k is IsMax(k, ...): 1 where x_k is the
    first largest. Both evaluate at numbers."""

    @classmethod
    def eval(cls, *args):
        if len(args) == 1:
            return args[0]
        if all(a.is_Number for a in args):
            return max(args, key=float)
        return None

    def fdiff(self, argindex=1):
        return IsMax(sympy.Integer(argindex - 1), *self.args)


class IsMax(sympy.Function):
    """1 where argument k + 1 is the first largest of the others, else 0 (its derivative is
    zero almost everywhere)."""

    @classmethod
    def eval(cls, k, *args):
        if all(a.is_Number for a in args):
            values = [float(a) for a in args]
            return sympy.Integer(int(values.index(max(values)) == int(k)))
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)
_SQRT2 = sympy.sqrt(2)

_UNARY = {
    "neg": lambda a: -a, "sigmoid": lambda a: 1 / (1 + sympy.exp(-a)), "tanh": sympy.tanh,
    "relu": lambda a: sympy.Max(a, 0), "silu": lambda a: a / (1 + sympy.exp(-a)),
    "gelu": lambda a: a * (1 + sympy.erf(a / _SQRT2)) / 2, "exp": sympy.exp, "log": sympy.log,
    "log1p": lambda a: sympy.log(1 + a), "expm1": lambda a: sympy.exp(a) - 1,
    "softplus": lambda a: sympy.log(1 + sympy.exp(a)),
    "logsigmoid": lambda a: -sympy.log(1 + sympy.exp(-a)), "sqrt": sympy.sqrt,
    "rsqrt": lambda a: 1 / sympy.sqrt(a), "abs": sympy.Abs, "sign": sympy.sign, "sin": sympy.sin,
    "cos": sympy.cos,
}
_BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "maximum": sympy.Max,
    "minimum": sympy.Min, "logaddexp": lambda a, b: sympy.log(sympy.exp(a) + sympy.exp(b)),
}


def _obj(x):
    return np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x


def _map(f, *arrays):
    arrays = np.broadcast_arrays(*[_obj(a) for a in arrays])
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = f(*(a[idx] for a in arrays))
    return out


def _reduce(arr, axis, combine):
    arr = _obj(arr)
    axes = range(arr.ndim) if axis is None else (axis,)
    moved = np.moveaxis(arr, list(axes), list(range(-len(axes), 0)))
    lead = moved.shape[:moved.ndim - len(axes)]
    flat = moved.reshape(lead + (-1,))
    out = np.empty(lead, dtype=object)
    for idx in np.ndindex(lead):
        out[idx] = combine(list(flat[idx]))
    return out


def probe_dims(cell: ir.CellIR, offset: int = 0) -> dict:
    """Small distinct dim values (2, 3, 4, ... shifted by `offset`) that satisfy the cell's
    constraints; dims fixed at generation keep their value."""
    free = [d for d in cell.dims if d.static is None]
    for scale in (1, 2, 3, 6, 12):
        values = {d.name: d.static for d in cell.dims if d.static is not None}
        for i, d in enumerate(free):
            values[d.name] = (2 + i + offset) * scale
        failing = _failing_constraint(cell, values)
        if failing is None:
            return values
    # the analysis needs sizes it can enumerate: a constraint no such size meets (x[10**20])
    # is the user's to see, where it was written
    from ..errors import CompileError
    tried = ", ".join(f"{k}={v}" for k, v in values.items())
    what = failing.failure or f"{failing.what} {failing.expr} is not a positive integer"
    raise CompileError(f"{what} at any size the analysis runs the cell at (up to {tried})",
                       failing.span)


def _failing_constraint(cell, values):
    """The first of the cell's constraints that `values` break, or None."""
    subs = {ir.dim_symbol(k): v for k, v in values.items()}
    for c in cell.constraints:
        v = sympy.sympify(c.expr).subs(subs)
        if not (v.is_integer and v > 0):
            return c
    return None


class Probe:
    """The element-wise symbolic values of every node of `cell` at concrete `dims`.

    `overrides` maps node ids to symbol-array names: that node's value is replaced by fresh
    symbols (to study the map from one intermediate value to another)."""

    def __init__(self, cell: ir.CellIR, dims: dict, overrides=()):
        self.cell = cell
        self.dims = dims
        self.subs = {ir.dim_symbol(k): v for k, v in dims.items()}
        self.state_symbols: dict = {}  # state name -> object array of its symbols
        self.override_symbols: dict = {}
        self.values: dict = {}
        overrides = dict(overrides)
        for n in cell.nodes:
            if n.id in overrides:
                self.values[n.id] = self.override_symbols[n.id] = self._symbols(
                    overrides[n.id], self.shape(n))
            else:
                self.values[n.id] = self._eval(n)

    @classmethod
    def evaluator(cls, subs=None):
        """A probe of no cell: `evaluate` computes one node from the values its caller put in
        `values` for the node's arguments (dims stay symbols unless `subs` gives them)."""
        probe = cls.__new__(cls)
        probe.cell, probe.dims, probe.subs = None, {}, dict(subs or {})
        probe.state_symbols, probe.override_symbols, probe.values = {}, {}, {}
        return probe

    def evaluate(self, n: ir.Node):
        """The element-wise value of node `n`, from the values of its arguments."""
        return self._eval(n)

    def shape(self, n) -> tuple:
        return tuple(int(sympy.sympify(s).subs(self.subs)) for s in n.type.shape)

    def _int(self, e) -> int:
        return int(sympy.sympify(e).subs(self.subs))

    @staticmethod
    def _symbols(name, shape):
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            out[idx] = sympy.Symbol(f"{name}[{','.join(map(str, idx))}]", real=True)
        return out

    def _eval(self, n: ir.Node):
        v = [self.values[a] for a in n.args]
        op = n.op
        if op in ("input", "param"):
            return self._symbols(f"{n.attr('name')}", self.shape(n))
        if op == "state":
            arr = self._symbols(f"{n.attr('name')}@prev", self.shape(n))
            self.state_symbols[n.attr("name")] = arr
            return arr
        if op == "const":
            return _obj(sympy.sympify(n.attr("value")).subs(self.subs))
        if op in _UNARY:
            return _map(_UNARY[op], v[0])
        if op in _BINARY:
            return _map(_BINARY[op], v[0], v[1])
        if op in _CMP:
            return _map(lambda a, b, f=_CMP[op]: f(a, b), v[0], v[1])
        if op == "where":
            return _map(lambda c, a, b: c * a + (1 - c) * b, *v)
        if op == "matmul":
            return _obj(np.matmul(_obj(v[0]), _obj(v[1])))
        if op == "outer":
            return np.multiply.outer(v[0], v[1])
        if op == "sum":
            return _reduce(v[0], n.attr("axis"), sympy.Add.fromiter)
        if op == "mean":
            return _reduce(v[0], n.attr("axis"), lambda xs: sympy.Add(*xs) / len(xs))
        if op == "amax":
            return _reduce(v[0], n.attr("axis"), lambda xs: Amax(*xs))
        if op == "logsumexp":
            return _reduce(v[0], n.attr("axis"),
                           lambda xs: sympy.log(sympy.Add(*[sympy.exp(x) for x in xs])))
        if op == "softmax":
            e = _map(sympy.exp, v[0])
            total = np.expand_dims(_reduce(e, n.attr("axis"), sympy.Add.fromiter), n.attr("axis"))
            return _map(lambda a, b: a / b, e, total)
        if op == "concat":
            return np.concatenate([_obj(a) for a in v], axis=n.attr("axis"))
        if op == "stack":
            return np.stack([_obj(a) for a in v], axis=n.attr("axis"))
        if op == "getitem":
            index = []
            for entry in n.attr("index"):
                if entry[0] == "new":
                    index.append(None)
                elif entry[0] == "int":
                    index.append(self._int(entry[1]))
                else:
                    index.append(slice(self._int(entry[1]), self._int(entry[2])))
            return _obj(_obj(v[0])[tuple(index)])
        if op == "transpose":
            return _obj(v[0]).T
        if op == "eye":
            k = self._int(n.attr("n"))
            return _obj(np.array([[sympy.Integer(int(i == j)) for j in range(k)]
                                  for i in range(k)], dtype=object))
        if op in ("zeros", "ones"):
            fill = sympy.Integer(0 if op == "zeros" else 1)
            out = np.empty(self.shape(n), dtype=object)
            out.fill(fill)
            return out
        raise NotImplementedError(f"probe: op {op}")


def jacobian(outputs, inputs):
    """d outputs / d inputs for flat lists of sympy expressions and symbols."""
    rows = []
    for y in outputs:
        free = y.free_symbols if isinstance(y, sympy.Basic) else set()
        rows.append([sympy.diff(y, x) if x in free else sympy.Integer(0) for x in inputs])
    return rows


def flat(arr) -> list:
    return list(_obj(arr).reshape(-1))


def product_index(shape):
    return list(itertools.product(*[range(s) for s in shape]))
