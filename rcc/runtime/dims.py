"""Numbers a generated module computes from its dims (a cell's `exp(1000 * d)`, `log(d - 1)`,
`d ** 0.5`), with the results torch gives in float64 where Python's math raises: overflow is
inf, log(0) is -inf, the log or square root of a negative number and a negative base to a
fractional power are nan, 0 to a negative power is inf."""
from __future__ import annotations

import math


def exp(x):
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def log(x):
    if x > 0:
        return math.log(x)
    return -math.inf if x == 0 else math.nan


def sqrt(x):
    return math.sqrt(x) if x >= 0 else math.nan


def pow(a, b):  # noqa: A001 (torch.pow's semantics)
    a, b = float(a), float(b)
    odd = b.is_integer() and int(b) % 2 == 1
    try:
        r = a ** b
    except ZeroDivisionError:  # 0 ** negative
        return math.copysign(math.inf, a) if odd else math.inf
    except OverflowError:
        return -math.inf if a < 0 and odd else math.inf
    return math.nan if isinstance(r, complex) else r
