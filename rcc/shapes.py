"""Shape rules on symbolic shapes: NumPy broadcasting and matmul, with errors naming both shapes."""
from __future__ import annotations

import sympy

from .errors import CompileError

ONE = sympy.Integer(1)


def same_dim(a, b) -> bool:
    return sympy.expand(a - b) == 0


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(s).replace("floor(", "(").replace("/", " // ") if "floor" in str(s)
                           else str(s) for s in shape) + "]"


def broadcast(shapes, span):
    """NumPy broadcasting: align right; each axis takes the one size that is not 1."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        size = ONE
        for s in shapes:
            k = axis - (rank - len(s))
            if k < 0 or same_dim(s[k], ONE):
                continue
            if same_dim(size, ONE):
                size = s[k]
            elif not same_dim(size, s[k]):
                raise CompileError("shape mismatch: " + " and ".join(fmt_shape(t) for t in shapes)
                                   + " cannot be broadcast together", span)
        out.append(size)
    return tuple(out)


def matmul_shape(a, b, span):
    """NumPy matmul for ranks 1 and 2."""
    if not a or not b:
        raise CompileError(f"@ needs vectors or matrices, got {fmt_shape(a)} @ {fmt_shape(b)} "
                           "(use * for scalars)", span)
    if len(a) > 2 or len(b) > 2:
        raise CompileError(f"@ of rank-3 values is not supported: {fmt_shape(a)} @ {fmt_shape(b)}",
                           span)
    inner_a = a[-1]
    inner_b = b[0] if len(b) == 1 else b[-2]
    if not same_dim(inner_a, inner_b):
        raise CompileError(f"shape mismatch in @: {fmt_shape(a)} @ {fmt_shape(b)} (inner sizes "
                           f"{inner_a} and {inner_b} differ)", span)
    return tuple(a[:-1]) + tuple(b[1:] if len(b) == 2 else ())
