"""Helpers shared by code printers: safe identifiers and printing of dim expressions."""
from __future__ import annotations

import builtins
import keyword
import math
import re

import sympy
from sympy.printing.pycode import PythonCodePrinter

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


_DOC_SAFE = re.compile(r"[^A-Za-z0-9 _.,:;/@+\-=()\[\]<>{}#%&*!?~^|$]")


def doc_text(text) -> str:
    """Outside text (a path, a Python function's name) as it may appear inside a generated
    docstring or comment: printable ASCII without quotes or backslashes (a path's backslashes
    become slashes, anything else '?'), so it can neither close the string nor form an escape."""
    return _DOC_SAFE.sub("?", str(text).replace("\\", "/"))


class Namespace:
    """Hands out unique Python identifiers. A user's name is kept when it is safe (a valid,
    non-reserved identifier); otherwise it gets a suffix. Names that start with '_' are the
    printer's own, so user names never take that form."""

    def __init__(self, reserved=()):
        self.taken = set(reserved) | set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))

    def new(self, hint: str) -> str:
        base = hint if _IDENT.match(hint or "") else "v"
        if base.startswith("_"):
            base = "u" + base
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


class DimPrinter(PythonCodePrinter):
    """Prints sympy expressions of dims as Python, with integer division for floor(a/b)."""

    def __init__(self, names: dict):
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self.names = names  # dim name -> local identifier

    def _print_Symbol(self, s):
        return self.names[s.name]

    def _print_floor(self, e):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den.is_Integer and num.is_integer:
            return f"(({self._print(num)}) // {den})"
        return f"math.floor({self._print(e.args[0])})"

    def _print_Float(self, f):
        v = float(f)
        if math.isinf(v):
            return "math.inf" if v > 0 else "(-math.inf)"
        return "math.nan" if math.isnan(v) else repr(v)

    def _print_Infinity(self, e):
        return "math.inf"

    def _print_NegativeInfinity(self, e):
        return "(-math.inf)"

    def _print_NaN(self, e):
        return "math.nan"

    # where math raises (overflow, a domain), the IEEE result torch gives (rcc.runtime.dims)
    def _print_exp(self, e):
        return f"_dims.exp({self._print(e.args[0])})"

    def _print_log(self, e):
        if len(e.args) > 1:
            return f"(_dims.log({self._print(e.args[0])}) / _dims.log({self._print(e.args[1])}))"
        return f"_dims.log({self._print(e.args[0])})"

    def _print_Pow(self, e, rational=False):
        if e.is_integer:  # a shape: exact integers
            return super()._print_Pow(e, rational)
        base, exponent = e.args
        if exponent == sympy.Rational(1, 2):
            return f"_dims.sqrt({self._print(base)})"
        return f"_dims.pow({self._print(base)}, {self._print(exponent)})"

    def _print_Rational(self, r):
        return repr(float(r))

    def _print_Integer(self, i):
        return str(int(i))


def dim_expr(expr, names: dict) -> str:
    expr = sympy.sympify(expr)
    if expr.is_number:
        return repr(int(expr)) if expr.is_integer else repr(float(expr))
    return DimPrinter(names).doprint(expr)


def regions(cell) -> dict:
    """Node id -> where a backend computes it: "const" (params and constants only: once),
    "seq" (inputs but no state: once for all steps) or "step" (reads a state: in the loop)."""
    region = {}
    for n in cell.nodes:
        if n.op == "state" or any(region[a] == "step" for a in n.args):
            region[n.id] = "step"
        else:
            region[n.id] = "seq" if n.type.batched else "const"
    return region
