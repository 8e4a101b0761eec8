"""Derived programs for the parallel plans, emitted as new IR nodes beside the cell's own:
forward-mode derivatives of the step by its states (the transition A of an affine cell, the
Jacobian of a nonlinear one) and copies of the step with its states replaced (b = f(0)).
"""
from __future__ import annotations

import sympy

from .. import ir
from ..builder import GraphBuilder
from ..errors import CompileError

ZERO = "zero"  # a value known to be zero everywhere (a substituted state, what multiplies it)

_NO_DERIVATIVE = {  # ops whose derivative the IR cannot express
    "gelu": "gelu's derivative needs erf, which rcc cannot emit yet; use silu or tanh-gelu",
}


class Linearizer:
    """Extends `cell`'s nodes; `cell.with_nodes(linearizer.nodes)` is the extended IR."""

    def __init__(self, cell):
        self.cell = cell
        self.b = GraphBuilder(cell.nodes)
        self.one = self.b.const(1, cell.span)

    @property
    def nodes(self):
        return self.b.nodes

    def node(self, i):
        return self.b.nodes[i]

    # ---- forward-mode derivative -----------------------------------------------------------
    def tangent(self, seeds: dict, roots) -> dict:
        """The directional derivative of each root when each node in `seeds` moves by its seed
        (a node id; `self.one` for all-ones). Returns root -> node id, or None where it is zero."""
        need = self.cone(roots)
        t = dict(seeds)
        for n in self.cell.nodes:
            if n.id in t or n.id not in need or n.op in ("input", "param", "state", "const"):
                continue
            ts = [t.get(a) for a in n.args]
            if any(x is not None for x in ts):
                t[n.id] = self._rule(n, ts)
        return {r: t.get(r) for r in roots}

    def cone(self, roots, stop=()):
        return ir.cone(self.b.nodes, roots, stop)

    def _c(self, value):
        return self.b.const(value, self.cell.span)

    def _bin(self, op, x, y):
        """x op y on node ids (ints), constants (Python floats) or None (zero), simplifying 0
        and 1."""
        x = self._c(x) if isinstance(x, float) else x
        y = self._c(y) if isinstance(y, float) else y
        if op == "mul":
            if x is None or y is None:
                return None
            if x == self.one:
                return y
            if y == self.one:
                return x
        if op in ("add", "sub") and y is None:
            return x
        if op == "add" and x is None:
            return y
        if op == "sub" and x is None:
            return self.b.unary("neg", y, self.cell.span)
        if op == "div" and x is None:
            return None
        return self.b.binary(op, x, y, self.cell.span)

    def _un(self, op, x):
        n = self.node(x)
        if op == "neg" and n.op == "neg":
            return n.args[0]  # -(-x)
        if op == "neg" and n.op == "mul" and self._is_minus_one(n.args[1]):
            return n.args[0]  # -(x * -1), what d(v - k @ S) / d(k @ S) times beta gives
        return self.b.unary(op, x, self.cell.span)

    def _is_minus_one(self, i):
        n = self.node(i)
        return n.op == "const" and float(n.attr("value")) == -1.0

    def _full(self, t, i):
        """Tangent `t` at the full shape of value `i` (an op like sum or @ needs every axis)."""
        shape = self.node(i).type.shape
        if t is None or t == self.one:
            return self.b.emit("zeros" if t is None else "ones", (), shape, self.cell.span)
        if tuple(self.node(t).type.shape) == tuple(shape):
            return t
        return self.b.binary("mul", t, self.b.emit("ones", (), shape, self.cell.span),
                             self.cell.span)

    def _structural(self, n, args):
        return self.b.emit(n.op, args, n.type.shape, n.span, n.attrs)

    def _rule(self, n, ts):
        op, x = n.op, n.id
        a = n.args
        bin_, un = self._bin, self._un
        if op == "add":
            return bin_("add", ts[0], ts[1])
        if op == "sub":
            return bin_("sub", ts[0], ts[1])
        if op == "neg":
            return un("neg", ts[0])
        if op == "mul":
            return bin_("add", bin_("mul", ts[0], a[1]), bin_("mul", a[0], ts[1]))
        if op == "div":  # (da - x db) / b
            return bin_("div", bin_("sub", ts[0], bin_("mul", x, ts[1])), a[1])
        if op == "pow":  # b a^(b-1) da + x log(a) db
            da = bin_("mul", bin_("mul", a[1], bin_("pow", a[0], bin_("sub", a[1], 1.0))), ts[0])
            return bin_("add", da, bin_("mul", bin_("mul", x, un("log", a[0])), ts[1]))
        if op in _DERIVATIVES:
            return bin_("mul", _DERIVATIVES[op](self, a[0], x), ts[0])
        if op in _NO_DERIVATIVE:
            raise CompileError(f"{_NO_DERIVATIVE[op]} (needed by this plan)", n.span)
        if op in ("maximum", "minimum"):
            pick = self.b.binary("ge" if op == "maximum" else "le", a[0], a[1], n.span)
            return self.b.emit("where", (pick, self._full(ts[0], x), self._full(ts[1], x)),
                               n.type.shape, n.span)
        if op == "logaddexp":  # exp(a - x) da + exp(b - x) db
            return bin_("add", bin_("mul", un("exp", bin_("sub", a[0], x)), ts[0]),
                        bin_("mul", un("exp", bin_("sub", a[1], x)), ts[1]))
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            return None  # a comparison is constant almost everywhere
        if op == "where":
            return self.b.emit("where", (a[0], self._full(ts[1], x), self._full(ts[2], x)),
                               n.type.shape, n.span)
        if op == "matmul":
            return bin_("add", self._maybe(n, (ts[0], a[1])), self._maybe(n, (a[0], ts[1])))
        if op == "outer":
            return bin_("add", self._maybe(n, (ts[0], a[1])), self._maybe(n, (a[0], ts[1])))
        if op in ("sum", "mean", "getitem", "transpose"):
            return self._structural(n, (self._full(ts[0], a[0]),))
        if op in ("concat", "stack"):
            return self._structural(n, tuple(self._full(t, i) for t, i in zip(ts, a)))
        if op == "softmax":  # x * (da - sum(x * da, axis)[..., None])
            da = self._full(ts[0], a[0])
            inner = self.b.reduce("sum", bin_("mul", x, da), n.attr("axis"), n.span)
            return bin_("mul", x, bin_("sub", da, self._unsqueeze(inner, n.attr("axis"), n)))
        if op == "logsumexp":  # sum(exp(a - x) da, axis)
            w = un("exp", bin_("sub", a[0], self._unsqueeze(x, n.attr("axis"), self.node(a[0]))))
            return self.b.reduce("sum", bin_("mul", w, self._full(ts[0], a[0])), n.attr("axis"),
                                 n.span)
        if op == "amax":  # da where a is the max (ties are measure zero)
            at_max = self.b.binary("eq", a[0], self._unsqueeze(x, n.attr("axis"),
                                                                self.node(a[0])), n.span)
            return self.b.reduce("sum", bin_("mul", at_max, self._full(ts[0], a[0])),
                                 n.attr("axis"), n.span)
        raise CompileError(f"the derivative of '{op}' is not supported (needed by this plan)",
                           n.span)

    def _maybe(self, n, args):
        """`n`'s op on new args; None when one of them is zero."""
        if any(v is None for v in args):
            return None
        full = tuple(self._full(v, i) if v != i else v for v, i in zip(args, n.args))
        return self._structural(n, full)

    def _unsqueeze(self, v, axis, like):
        """Reinsert a reduced axis (size 1) so `v` broadcasts against the reduced value `like`."""
        rank = like.type.rank
        if axis is None:
            return v  # a full reduction is a scalar, which broadcasts already
        index = tuple(("slice", sympy.Integer(0), s) for s in like.type.shape[:axis]) + (("new",),)
        shape = tuple(like.type.shape[:axis]) + (sympy.Integer(1),) + tuple(like.type.shape[axis + 1:rank])
        return self.b.emit("getitem", (v,), shape, like.span, (("index", index),))

    # ---- substitution ------------------------------------------------------------------------
    def substitute(self, mapping: dict, roots) -> dict:
        """Copies of `roots` with the nodes in `mapping` replaced (by a node id or ZERO)."""
        need = self.cone(roots)
        new = dict(mapping)
        for n in self.cell.nodes:
            if n.id in new or n.id not in need or not any(a in new for a in n.args):
                continue
            args = [new.get(a, a) for a in n.args]
            new[n.id] = self._zero_rule(n, args)
        return {r: new.get(r, r) for r in roots}

    def _zero_rule(self, n, args):
        op = n.op
        zero = [a == ZERO for a in args]
        if op in ("mul", "matmul", "outer") and any(zero):
            return ZERO
        if op in ("div", "neg", "getitem", "transpose", "sum", "mean") and zero[0]:
            return ZERO
        if op in ("add", "sub") and any(zero):
            if all(zero):
                return ZERO
            kept = args[0] if zero[1] else args[1]
            # x + 0 is x only where x has the sum's shape: a scalar plus zeros(d) is [d]
            if tuple(self.node(kept).type.shape) == tuple(n.type.shape):
                if zero[1]:
                    return kept
                return kept if op == "add" else self.b.unary("neg", kept, n.span)
        if op == "where" and zero[1] and zero[2]:
            return ZERO
        args = [self.materialize(a, i) for a, i in zip(args, n.args)]
        return self.b.emit(op, tuple(args), n.type.shape, n.span, n.attrs)

    def materialize(self, v, i):
        """`v`, or zeros of the shape of value `i` where `v` is ZERO."""
        if v != ZERO:
            return v
        return self.b.emit("zeros", (), self.node(i).type.shape, self.cell.span)

    def depends_on(self, v, leaves) -> bool:
        return v not in (None, ZERO) and bool(self.cone([v]) & set(leaves))


# d op(a) / da in terms of the argument a and the result x: reusing x keeps the derivative cheap
# and stable (sigmoid' = x (1 - x) never divides exp by exp). tests/test_linearize.py checks
# each against sympy's derivative of the same function.
_DERIVATIVES = {
    "sigmoid": lambda L, a, x: L._bin("mul", x, L._bin("sub", 1.0, x)),
    "tanh": lambda L, a, x: L._bin("sub", 1.0, L._bin("mul", x, x)),
    "exp": lambda L, a, x: x,
    "expm1": lambda L, a, x: L._bin("add", x, 1.0),
    "log": lambda L, a, x: L._bin("div", 1.0, a),
    "log1p": lambda L, a, x: L._bin("div", 1.0, L._bin("add", a, 1.0)),
    "softplus": lambda L, a, x: L._un("sigmoid", a),
    "logsigmoid": lambda L, a, x: L._un("sigmoid", L._un("neg", a)),
    "relu": lambda L, a, x: L._bin("gt", a, 0.0),
    "silu": lambda L, a, x: L._bin("mul", L._un("sigmoid", a),
                                   L._bin("sub", L._bin("add", a, 1.0), x)),
    "sqrt": lambda L, a, x: L._bin("div", 0.5, x),
    "rsqrt": lambda L, a, x: L._bin("div", L._bin("mul", -0.5, x), a),
    "abs": lambda L, a, x: L._un("sign", a),
    "sign": lambda L, a, x: L._c(0.0),
    "sin": lambda L, a, x: L._un("cos", a),
    "cos": lambda L, a, x: L._un("neg", L._un("sin", a)),
}
