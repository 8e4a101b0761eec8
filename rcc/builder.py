"""GraphBuilder: appends typed, hash-consed nodes to an IR node list, folding constants.

The elaborator builds a cell's IR with it; the plan passes (rcc/passes/linearize.py) extend an
existing cell's IR with it (derivatives, substituted copies).
"""
from __future__ import annotations

import math

import sympy

from . import ir
from .errors import CompileError
from .shapes import broadcast, matmul_shape

# sympy versions of elementwise functions, for folding constant sub-expressions
_FOLD = {
    "neg": lambda a: -a, "exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt,
    "rsqrt": lambda a: 1 / sympy.sqrt(a), "abs": sympy.Abs, "sign": sympy.sign, "sin": sympy.sin,
    "cos": sympy.cos, "tanh": sympy.tanh, "sigmoid": lambda a: 1 / (1 + sympy.exp(-a)),
    "log1p": lambda a: sympy.log(1 + a), "expm1": lambda a: sympy.exp(a) - 1,
    "relu": lambda a: sympy.Max(a, 0), "add": lambda a, b: a + b, "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b, "div": lambda a, b: a / b, "pow": lambda a, b: a ** b,
    "maximum": sympy.Max, "minimum": sympy.Min,
    "silu": lambda a: a / (1 + sympy.exp(-a)), "gelu": lambda a: a * (1 + sympy.erf(a / sympy.sqrt(2))) / 2,
    # the stable forms, so a generated module evaluating them at its dims does not overflow
    "softplus": lambda a: sympy.Max(a, 0) + sympy.log(1 + sympy.exp(-sympy.Abs(a))),
    "logsigmoid": lambda a: sympy.Min(a, 0) - sympy.log(1 + sympy.exp(-sympy.Abs(a))),
    "logaddexp": lambda a, b: sympy.Max(a, b) + sympy.log(1 + sympy.exp(-sympy.Abs(a - b))),
    **{op: (lambda rel: lambda a, b: sympy.Piecewise((1, rel(a, b)), (0, True)))(rel)
       for op, rel in (("lt", sympy.Lt), ("le", sympy.Le), ("gt", sympy.Gt), ("ge", sympy.Ge),
                       ("eq", sympy.Eq), ("ne", sympy.Ne))},
}


def _sigmoid(a):
    return 1 / (1 + math.exp(-a)) if a >= 0 else math.exp(a) / (1 + math.exp(a))


def _softplus(a):
    return a if a > 20 else math.log1p(math.exp(a))  # torch's threshold, so no overflow


# Float versions of the same, for constants that are plain numbers: evaluated as torch would in
# float64 (sympy's exact arithmetic could take forever on 10 ** 10 ** 10). They raise
# ValueError, OverflowError or ZeroDivisionError where the result is not a finite real number.
_FLOAT_FOLD = {
    "neg": lambda a: -a, "exp": math.exp, "log": math.log, "sqrt": math.sqrt,
    "rsqrt": lambda a: 1 / math.sqrt(a), "abs": abs, "sign": lambda a: float((a > 0) - (a < 0)),
    "sin": math.sin, "cos": math.cos, "tanh": math.tanh, "sigmoid": _sigmoid,
    "log1p": math.log1p, "expm1": math.expm1, "relu": lambda a: max(a, 0.0),
    "silu": lambda a: a * _sigmoid(a), "gelu": lambda a: a * (1 + math.erf(a / math.sqrt(2))) / 2,
    "softplus": _softplus, "logsigmoid": lambda a: -_softplus(-a),
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": math.pow, "maximum": max, "minimum": min,
    "logaddexp": lambda a, b: max(a, b) + math.log1p(math.exp(-abs(a - b))),
    "lt": lambda a, b: float(a < b), "le": lambda a, b: float(a <= b),
    "gt": lambda a, b: float(a > b), "ge": lambda a, b: float(a >= b),
    "eq": lambda a, b: float(a == b), "ne": lambda a, b: float(a != b),
}
_OP_TEXT = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "lt": "<", "le": "<=",
            "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "maximum": "max", "minimum": "min"}

def fmt_number(value) -> str:
    if value.is_Integer:
        text = str(value)
        return text if len(text) <= 24 else f"{text[:8]}...({len(text)} digits)"
    return f"{float(value):g}"


def _is_finite_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):  # complex, zoo, nan or past float64
        return False


class GraphBuilder:
    def __init__(self, nodes=()):
        self.nodes: list = list(nodes)
        # (op, args, attrs, shape) -> id: an equal expression is emitted once. The shape is part
        # of the key because zeros() and ones() have no args: ones(1) is not ones(e, d)
        self.memo: dict = {(n.op, n.args, n.attrs, n.type.shape): n.id for n in self.nodes}

    def emit(self, op, args, shape, span, attrs=(), batched=None) -> int:
        args = tuple(args)
        attrs = tuple(sorted(attrs))
        if batched is None:
            batched = op in ("input", "state", "slot", "pred") or any(self.nodes[a].type.batched for a in args)
        key = (op, args, attrs, tuple(shape))
        if key in self.memo:
            return self.memo[key]
        node = ir.Node(len(self.nodes), op, args, attrs, ir.Type(tuple(shape), batched), span)
        self.nodes.append(node)
        self.memo[key] = node.id
        return node.id

    def const(self, value, span) -> int:
        value = sympy.sympify(value)
        if value.is_number and not _is_finite_number(value) or value.is_real is False:
            shown = str(value) if len(str(value)) <= 24 else "a number"
            raise CompileError(f"the constant {shown} is not a finite real number "
                               "(in 64-bit floats)", span)
        return self.emit("const", (), (), span, (("value", value),))

    def shape(self, vid):
        return self.nodes[vid].type.shape

    def const_value(self, vid):
        n = self.nodes[vid]
        return n.attr("value") if n.op == "const" else None

    def materialize(self, vid, span) -> int:
        """A const as a 0-d tensor node (zeros() + c), where a value must be a tensor (a state's
        next value, an output, a stack() operand) and not the Python scalar a const prints as."""
        if self.const_value(vid) is None:
            return vid
        zero = self.emit("zeros", (), (), span)
        return self.emit("add", (zero, vid), (), span)

    def reduce(self, op, x, axis, span):
        shape = self.shape(x)
        if not shape:
            return x
        out = () if axis is None else shape[:axis] + shape[axis + 1:]
        return self.emit(op, (x,), out, span, (("axis", axis),))

    def unary(self, op, x, span):
        c = self.const_value(x)
        if c is not None:
            return self.fold(op, (c,), span)
        return self.emit(op, (x,), self.shape(x), span)

    def binary(self, op, a, b, span):
        ca, cb = self.const_value(a), self.const_value(b)
        if ca is not None and cb is not None:
            if op == "div" and cb == 0:
                raise CompileError("division by zero", span)
            return self.fold(op, (ca, cb), span)
        shape = broadcast([self.shape(a), self.shape(b)], span)
        return self.emit(op, (a, b), shape, span)

    def fold(self, op, args, span) -> int:
        """The const node of `op` applied to constants. Every elementwise op folds: a const is a
        Python scalar in generated code, and torch functions do not take those."""
        if all(a.is_number for a in args):
            try:
                value = _FLOAT_FOLD[op](*(float(a) for a in args))
            except (ValueError, OverflowError, ZeroDivisionError):
                value = math.nan
            if not math.isfinite(value):
                shown = [fmt_number(a) for a in args]
                if len(args) == 2 and op not in ("maximum", "minimum", "logaddexp"):
                    text = f" {_OP_TEXT[op]} ".join(f"({s})" if s.startswith("-") else s
                                                    for s in shown)
                else:
                    text = f"{_OP_TEXT.get(op, op)}({', '.join(shown)})"
                raise CompileError(f"the constant {text} is not a finite real number "
                                   "(in 64-bit floats)", span)
            return self.const(sympy.Float(value), span)
        if op == "pow" and args[1].is_number and abs(args[1]) > 64:
            # generated code evaluates this in Python ints once dims are bound: d ** 10 ** 9
            # would run for minutes, and the float it ends as overflows anyway
            raise CompileError(f"the exponent {fmt_number(args[1])} is too large for an "
                               "expression of dims (at most 64)", span)
        return self.const(_FOLD[op](*args), span)

    def matmul(self, a, b, span):
        shape = matmul_shape(self.shape(a), self.shape(b), span)
        return self.emit("matmul", (a, b), shape, span)
