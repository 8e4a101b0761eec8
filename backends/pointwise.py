"""Elementwise ops as sympy expressions and their derivatives (shared by the kernel backends).

Each pointwise IR op becomes a sympy expression of its argument symbols. Ops a target language
has no function for (sigmoid, softplus, ...) are sympy Functions with a `c_name`: the C++ and
Triton printers print them as calls to `rcc_*` helpers of their kernel prelude, written there in
a numerically stable form; their `fdiff` gives the derivative sympy differentiates with. Backward
kernels are printed from `sympy.diff` of these expressions.
"""
from __future__ import annotations

import sympy
from sympy.codegen.cfunctions import expm1, log1p

from rcc import ir


class Helper(sympy.Function):
    """A function printed as a call to the prelude's `c_name`."""
    c_name = ""


def _helper(c_name, derivatives=None):
    """A Helper subclass; `derivatives(*args)` returns the partials (None: zero almost
    everywhere)."""
    def fdiff(self, argindex=1):
        if derivatives is None:
            return sympy.Integer(0)
        return derivatives(*self.args)[argindex - 1]
    return type(c_name, (Helper,), {"c_name": c_name, "fdiff": fdiff})


Sigmoid = _helper("rcc_sigmoid", lambda x: (Sigmoid(x) * (1 - Sigmoid(x)),))
Step = _helper("rcc_step")  # 1 where x > 0, else 0
TieStep = _helper("rcc_tiestep")  # 1 where x > 0, 1/2 where x == 0 (torch splits ties)
Sign = _helper("rcc_sign")
Relu = _helper("rcc_relu", lambda x: (Step(x),))
Abs = _helper("rcc_abs", lambda x: (Sign(x),))
Softplus = _helper("rcc_softplus", lambda x: (Sigmoid(x),))
LogSigmoid = _helper("rcc_logsigmoid", lambda x: (Sigmoid(-x),))
Silu = _helper("rcc_silu", lambda x: (Sigmoid(x) * (1 + x * (1 - Sigmoid(x))),))
_SQRT2 = sympy.sqrt(2)
Gelu = _helper("rcc_gelu", lambda x: (
    (1 + sympy.erf(x / _SQRT2)) / 2 + x * sympy.exp(-x ** 2 / 2) / sympy.sqrt(2 * sympy.pi),))
Maximum = _helper("rcc_max", lambda a, b: (TieStep(a - b), TieStep(b - a)))
Minimum = _helper("rcc_min", lambda a, b: (TieStep(b - a), TieStep(a - b)))
LogAddExp = _helper("rcc_logaddexp", lambda a, b: (Sigmoid(a - b), Sigmoid(b - a)))
Where = _helper("rcc_where", lambda c, a, b: (0, Where(c, 1, 0), Where(c, 0, 1)))
COMPARE = {op: _helper(f"rcc_{op}") for op in ir.COMPARE}  # 1 or 0, no gradient

UNARY = {
    "neg": lambda a: -a, "sigmoid": Sigmoid, "tanh": sympy.tanh, "relu": Relu, "silu": Silu,
    "gelu": Gelu, "exp": sympy.exp, "log": sympy.log, "log1p": log1p, "expm1": expm1,
    "softplus": Softplus, "logsigmoid": LogSigmoid, "sqrt": sympy.sqrt,
    "rsqrt": lambda a: 1 / sympy.sqrt(a), "abs": Abs, "sign": Sign, "sin": sympy.sin,
    "cos": sympy.cos,
}
BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "maximum": Maximum,
    "minimum": Minimum, "logaddexp": LogAddExp, "outer": lambda a, b: a * b,
    **COMPARE,
}
POINTWISE = set(UNARY) | set(BINARY) | {"where"}


def pointwise(op: str, args: list):
    """The sympy expression of pointwise `op` on `args` (sympy expressions)."""
    if op in UNARY:
        return UNARY[op](args[0])
    if op == "where":
        return Where(*args)
    return BINARY[op](*args)


def derivatives(op: str, args: list, result: sympy.Symbol):
    """The partial derivatives of `op` by each argument, written with `result` standing for the
    op's own value where it appears (sigmoid' = y (1 - y)). Zero partials are sympy zeros."""
    y = pointwise(op, args)
    out = []
    for a in args:
        if not isinstance(a, sympy.Symbol):
            out.append(sympy.Integer(0))  # a constant argument
            continue
        d = sympy.diff(y, a)
        if y.func not in (sympy.Add, sympy.Mul, sympy.Pow) and not y.is_Symbol:
            d = d.subs(y, result)
        out.append(d)
    return out
