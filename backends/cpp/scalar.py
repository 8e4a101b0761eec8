"""Printing the elementwise ops' sympy expressions (backends/pointwise.py) as C++."""
from __future__ import annotations

import sympy
from sympy.printing.cxx import CXX17CodePrinter

from ..pointwise import Helper


class CxxPrinter(CXX17CodePrinter):
    """Prints a scalar expression for a kernel templated on its float type `R`: numbers as
    `R(...)`, so float32 code stays in float32; symbols through `names` (argument symbol -> C++
    expression, dim name -> C++ constant); small integer powers as products."""

    def __init__(self, names: dict):
        super().__init__({"strict": False})
        self.names = names

    def _print_Symbol(self, s):
        text = self.names[s.name]
        return f"R({text})" if s.is_integer else text  # a dim: a long constant

    def _print_Integer(self, i):
        # beyond 2^31 as a floating literal: a C++ integer literal past 64 bits wraps silently
        return f"R({int(i)})" if abs(int(i)) < 2 ** 31 else f"R({float(i)!r})"

    def _print_Rational(self, r):
        return f"R({float(r)!r})"

    def _print_Float(self, f):
        return f"R({float(f)!r})"

    def _print_NumberSymbol(self, s):
        return f"R({float(s)!r})"

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_Pow(self, e):
        base, exp = e.args
        b = self.parenthesize(base, sympy.printing.precedence.PRECEDENCE["Mul"] + 1)
        if exp == 2:
            return f"({b}*{b})"
        if exp == 3:
            return f"({b}*{b}*{b})"
        if exp == -1:
            return f"(R(1)/{b})"
        if exp == -2:
            return f"(R(1)/({b}*{b}))"
        if exp == sympy.Rational(1, 2):
            return f"std::sqrt({self._print(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"(R(1)/std::sqrt({self._print(base)}))"
        if base == sympy.E:
            return f"std::exp({self._print(exp)})"
        return f"std::pow({self._print(base)}, {self._print(exp)})"

    def _print_Function(self, e):
        if isinstance(e, Helper):
            return f"{e.c_name}({', '.join(self._print(a) for a in e.args)})"
        return super()._print_Function(e)


def cxx(expr, names: dict) -> str:
    return CxxPrinter(names).doprint(expr)
