"""The plan passes' derivatives (rcc.passes.linearize) against sympy's: the tangent of the step
seeded with ones on the state must equal J @ 1, J the exact Jacobian of the sympy-evaluated step."""
import numpy as np
import pytest
import sympy

from rcc.api import build_ir
from rcc.passes.linearize import ZERO, Linearizer
from rcc.passes.probe import _CMP, Probe, NoGrad, flat, jacobian

_TESTS = {cls: op for op, cls in _CMP.items()}
_PY = {"lt": float.__lt__, "le": float.__le__, "gt": float.__gt__, "ge": float.__ge__,
       "eq": float.__eq__, "ne": float.__ne__}

POSITIVE = "(h * h + x * x + 0.5)"
EXPRESSIONS = {
    **{op: f"{op}(h * x + 0.3)" for op in ("sigmoid", "tanh", "exp", "expm1", "softplus",
                                           "logsigmoid", "silu", "sin", "cos", "abs", "relu")},
    **{op: f"{op}{POSITIVE}" for op in ("log", "log1p", "sqrt", "rsqrt")},
    "div": f"x / {POSITIVE}", "pow": f"{POSITIVE} ** (x * x)", "max": "max(h, x)",
    "min": "min(h * 2, x)", "logaddexp": "logaddexp(h, x * h)", "where": "where(h > x, h * h, x)",
    "softmax": "softmax(h * x)", "logsumexp": "logsumexp(h * x) + h", "amax": "amax(h * x) + h",
    "sum": "sum(h * x) * h", "mean": "mean(h) + x", "matmul": "W @ h + h * x",
    "outer": "sum(outer(h, x), 1)", "concat": "concat(h, x)[1:d + 1]",
    "stack": "sum(stack(h, x * h, axis=1), 1)", "getitem": "h[1:3] @ W[1:3, :]",
}


def _cell(expr):
    return f"""
cell C(d = 3) {{
    input x[d]
    param W[d, d]
    state h[d]
    h' = {expr}
    output y = h'
}}"""


def _numeric(values, rng):
    syms = sorted({s for e in values for s in sympy.sympify(e).free_symbols}, key=str)
    point = {s: float(rng.uniform(0.2, 0.9)) for s in syms}
    def value(e):
        e = sympy.sympify(e).xreplace(point)
        # the probe's comparisons are opaque functions: evaluate them at the point
        e = e.replace(lambda f: isinstance(f, NoGrad), lambda f: sympy.Float(float(
            _PY[_TESTS[type(f)]](float(f.args[0]), float(f.args[1])))))
        return float(sympy.N(e))
    return np.array([value(e) for e in values])


@pytest.mark.parametrize("name", sorted(EXPRESSIONS))
def test_tangent_equals_sympy_jacobian_times_ones(name):
    cell, _, _ = build_ir(_cell(EXPRESSIONS[name]))
    lin = Linearizer(cell)
    h = next(n.id for n in cell.nodes if n.op == "state")
    update = dict(cell.updates)["h"]
    tangent = lin.tangent({h: lin.one}, [update])[update]
    extended = cell.with_nodes(lin.nodes)
    probe = Probe(extended, {"d": 3})
    state = flat(probe.state_symbols["h"])
    out = [sympy.sympify(e) for e in flat(probe.values[update])]
    want = [sum(row) for row in jacobian(out, state)]
    got = np.broadcast_to(np.asarray(probe.values[tangent], dtype=object), (3,))
    rng = np.random.default_rng(0)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        w = _numeric(want, rng)
        rng = np.random.default_rng(seed)
        g = _numeric(list(got), rng)
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_substitute_zero_drops_what_multiplies_the_state():
    cell, _, _ = build_ir(_cell("sigmoid(x) * h + tanh(x) - (W @ h) * 2"))
    lin = Linearizer(cell)
    h = next(n.id for n in cell.nodes if n.op == "state")
    update = dict(cell.updates)["h"]
    offset = lin.substitute({h: ZERO}, [update])[update]
    assert not lin.depends_on(offset, [h])
    ops = {lin.node(i).op for i in lin.cone([offset])}
    assert "matmul" not in ops and "sigmoid" not in ops  # both multiplied the zero state
