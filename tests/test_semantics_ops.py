"""Semantics of every expression form (LANGUAGE.md section 6) on the torch backend.

Each case puts one expression into a cell whose names cover every rank (0 to 3) and both kinds of
value: batched ones (inputs and states, which carry the batch axis N = B * heads at run time) and
unbatched ones (params, dims, constants, hoisted before the time loop). The reference evaluates
the same expression per sequence element on unbatched float64 tensors (semantics_harness), where
torch follows NumPy, and compares outputs, final states and gradients.
"""
import pytest
import torch

from semantics_harness import FUNCTIONS, as_tensor, instantiate, run_and_compare, run_python

# Batched:   a [], x [d], z [e], X [e, d], A [e, d, d] (inputs); r [], s [d], S [d, d], G [e, d]
#            (states, given random initial values and never updated here).
# Unbatched: c [], p [d], q [e], W [e, d], M [d, d], P [e, d, d] (params); dims d, e.
ZOO = """
cell Zoo(d, e) {{
    input a, x[d], z[e], X[e, d], A[e, d, d]
    param c, p[d], q[e], W[e, d], M[d, d], P[e, d, d]
    state r, s[d], S[d, d], G[e, d]
{lines}
    output y = {expr}
}}
"""
# (dims, batch, time steps, heads): odd sizes, a size-1 axis, one and two head axes
CONFIGS = {
    "d3e2": (dict(d=3, e=2), 2, 2, (2,)),
    "d2e1": (dict(d=2, e=1), 1, 1, (3, 1)),
}


def check(expr, ref=None, lines="", config="d3e2"):
    """`ref(v)`: the reference value of `expr`; by default `expr` itself (with `lines` run
    first), evaluated as Python on unbatched tensors."""
    body = "".join(f"    {ln.strip()}\n" for ln in lines.strip().splitlines())
    dims, B, T, heads = CONFIGS[config]
    m = instantiate(ZOO.format(lines=body, expr=expr), **dims)
    if ref is None:
        def ref(v):
            return run_python(lines.strip(), vars(v), expr)
    return run_and_compare(m, lambda v: {"y": ref(v)}, B=B, T=T, heads=heads)


def cases(*items):
    """pytest params for several configs, with readable ids."""
    out = []
    for item in items:
        expr, ref = item if isinstance(item, tuple) else (item, None)
        for config in CONFIGS:
            out.append(pytest.param(expr, ref, config, id=f"{expr}-{config}"))
    return out


# ---- arithmetic and broadcasting -------------------------------------------------------------
ARITHMETIC = cases(
    "x + p", "p - x", "x * W", "W / (x * x + 1)", "x * X", "X - x", "a * M", "a * S", "r * M",
    "c * S", "c * x", "a + x", "x - a", "r * S + a", "c + p", "W * p - c", "M / (c * c + 1)",
    "x ** 2", "2 ** x", "(x * x + 1) ** a", "(p * p + 1) ** c", "(S * S + 0.5) ** p",
    "(M * M + 0.5) ** x", "(x * x + 1) ** 2 ** 0.5", "-x", "-W", "-(a * M)", "- x ** 2", "-x * -p",
    "x[:, None] * S", "p[:, None] * S", "x[:, None] * M", "x[None, :] * S", "x[:, None] * x",
    "x[:, None] * p", "p[:, None] * x", "z[:, None] * X", "q[:, None] * X", "z[:, None] * W",
    "A * M", "P * S", "P * x", "A * x", "X[:, :, None] * S", "G[:, None] * M", "a * P",
    "c * A", "A + G[:, :, None]", "P + X[:, None]", "A / (P * P + 1)", "a - c", "r * c",
    "x + S + A", "p + M + P", "(a + c) * (x - p) / (M * M + 1)",
    # long enough that the printer splits it over several lines
    "x * p + x * x * 2 + sigmoid(x) * tanh(p + x) + logaddexp(x, p) * softplus(x - p) + relu(x * 3 - p)"
    " + exp(-x * x) * cos(x + a) - sin(S @ x) * abs(x - a * s)",
    "(a * a + (c * c - -x * x)) ** 2 ** -x - -(-x) * (x - (p - (x - s))) / (x / (p / (s * s + 1)) + 9)",
)


@pytest.mark.parametrize("expr, ref, config", ARITHMETIC)
def test_arithmetic_broadcasting(expr, ref, config):
    check(expr, ref, config=config)


# ---- comparisons, where, max/min, logaddexp --------------------------------------------------
def _cmp(op):
    return lambda a, b: {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b,
                         "!=": a != b}[op].to(torch.float64)


COMPARISONS = cases(
    ("x < p", lambda v: _cmp("<")(v.x, v.p)),
    ("0 < x", lambda v: _cmp("<")(as_tensor(0), v.x)),
    ("x >= W", lambda v: _cmp(">=")(v.x, v.W)),
    ("S <= M", lambda v: _cmp("<=")(v.S, v.M)),
    ("a > x", lambda v: _cmp(">")(v.a, v.x)),
    ("c > a", lambda v: _cmp(">")(v.c, v.a)),
    ("p < c", lambda v: _cmp("<")(v.p, v.c)),
    ("0.25 >= M", lambda v: _cmp(">=")(as_tensor(0.25), v.M)),
    ("x * x == x * x", lambda v: _cmp("==")(v.x * v.x, v.x * v.x)),
    ("x != s", lambda v: _cmp("!=")(v.x, v.s)),
    ("p == p", lambda v: _cmp("==")(v.p, v.p)),
    ("x + 1 > p * 2", lambda v: _cmp(">")(v.x + 1, v.p * 2)),
    ("a * (d > 2)", lambda v: v.a * float(v.d > 2)),
    ("x * (1 < 2) + (0.5 > 1)", lambda v: v.x),
    ("(x > 0) * x + (x <= 0) * p", lambda v: torch.where(v.x > 0, v.x, v.p)),
    "where(x > 0, x, p)", "where(a > 0, S, M)", "where(p > 0, x, 0.5)", "where(c > 0, W, 1.0)",
    "where(x > 0, 1.0, -1.0)", "where(x > p, X, W)", "where(S, S, 0)", "where(M > 0, a, c)",
    "where(a > c, s, r)", "where(1, x, p)",
    "max(x, p)", "max(x, 0)", "min(0.5, S)", "max(a, M)", "min(p, W)", "max(c, 0.0)",
    "max(x, X)", "min(a, c)", "max(d, x)", "min(S, A)", "max(-1, min(x, 1))",
    "logaddexp(x, p)", "logaddexp(x, 0)", "logaddexp(1.0, S)", "logaddexp(a, W)",
    "logaddexp(c, p)", "logaddexp(x, X)", "logaddexp(c, 2)", "logaddexp(0, 1)",
)


@pytest.mark.parametrize("expr, ref, config", COMPARISONS)
def test_comparisons_where_max_min_logaddexp(expr, ref, config):
    check(expr, ref, config=config)


@pytest.mark.parametrize("config", CONFIGS)
def test_named_comparison_used_as_condition_and_value(config):
    # a comparison bound to a name is a 0/1 float; where() then tests it against 0
    check("where(m, x, p) + m * 2 + where(n, S, M)", None, config=config,
          lines="m = x > p\nn = a > r")


def test_comparisons_have_no_gradient():
    m = instantiate(ZOO.format(lines="", expr="(x < p) + (S > a)"), d=3, e=2)
    xs = {n: torch.randn(2, 1, *m.shapes[n], dtype=torch.float64, requires_grad=True)
          for n in m.INPUTS}
    y, _ = m(**xs)
    assert not y.requires_grad


# ---- elementwise functions -------------------------------------------------------------------
POSITIVE_DOMAIN = {"log", "sqrt", "rsqrt"}
UNARY = ["sigmoid", "tanh", "relu", "silu", "gelu", "exp", "log", "log1p", "expm1", "softplus",
         "logsigmoid", "sqrt", "rsqrt", "abs", "sign", "sin", "cos"]


def _unary_cases():
    out = []
    for f in UNARY:
        if f in POSITIVE_DOMAIN:
            args = ["X * X + 0.5", "W * W + 0.5", "a * a * M * M + S * S + 0.3", "0.7", "d"]
        elif f == "log1p":
            args = ["X * X", "W * W", "a * a * M * M + S * S", "0.7", "d"]
        else:
            args = ["X", "W", "a * M + S", "0.7", "d"]
        out += cases(*(f"{f}({arg}) * x[0]" if arg in ("0.7", "d") else f"{f}({arg})"
                       for arg in args))
    return out


@pytest.mark.parametrize("expr, ref, config", _unary_cases())
def test_elementwise_functions(expr, ref, config):
    check(expr, ref, config=config)


# ---- matmul, dot, outer ------------------------------------------------------------------------
# x, s batched vectors; p unbatched vector; S batched matrix; M, W unbatched; X, G batched [e, d]
MATMUL = cases(
    "W @ x", "M @ s", "W @ s", "x @ M", "x @ W.T", "s @ M", "p @ x", "x @ p", "p @ p", "x @ s",
    "s @ s", "S @ x", "x @ S", "S @ S", "M @ S", "S @ M", "X @ S", "X @ M", "W @ S", "M @ M",
    "W @ M", "p @ M", "M @ p", "S @ p", "p @ S", "X @ x", "x @ X.T", "X @ p", "p @ X.T",
    "X.T @ z", "W.T @ z", "z @ W", "z @ X", "q @ W", "W @ M @ x", "X @ G.T", "G @ X.T @ z",
    "(S @ S) @ (M @ x)", "(a * W) @ (c * x)",
    "dot(x, p)", "dot(x, s)", "dot(p, p)", "dot(a, x)", "dot(c, x)", "dot(p, c)",
    "outer(x, p)", "outer(p, x)", "outer(x, s)", "outer(p, q)", "outer(z, x)", "outer(q, p)",
)


@pytest.mark.parametrize("expr, ref, config", MATMUL)
def test_matmul_dot_outer(expr, ref, config):
    check(expr, ref, config=config)


# ---- reductions, softmax, l2norm ---------------------------------------------------------------
REDUCTIONS = cases(
    "sum(x)", "sum(W)", "sum(S, 0)", "sum(S, axis=1)", "sum(A, -1)", "sum(A, axis=-2)",
    "sum(P, 0)", "sum(a)", "sum(c)", "sum(x, 0)", "sum(x * p)", "sum(M * S, axis=-1)",
    "mean(X, 1)", "mean(A)", "mean(W, axis=-1)", "mean(P, -3)", "mean(x)",
    "amax(X, 0)", "amax(S)", "amax(P, axis=1)", "amax(W)", "amax(x - p)",
    "logsumexp(x)", "logsumexp(S, -1)", "logsumexp(W, 0)", "logsumexp(A, axis=1)",
    "logsumexp(M)", "logsumexp(A)",
    "softmax(x)", "softmax(S)", "softmax(S, axis=0)", "softmax(W)", "softmax(A, axis=1)",
    "softmax(P, axis=-3)", "softmax(x + p)", "softmax(M, axis=0)",
    "l2norm(x)", "l2norm(S)", "l2norm(W)", "l2norm(A)", "l2norm(p + x)", "l2norm(a)",
    "sum(sum(A, 0), 1) * mean(W)",
)


@pytest.mark.parametrize("expr, ref, config", REDUCTIONS)
def test_reductions_softmax_l2norm(expr, ref, config):
    check(expr, ref, config=config)


# ---- eye, zeros, ones, concat, stack, split, chunk ---------------------------------------------
BUILDERS = cases(
    "x + zeros(d)", "S + eye(d)", "ones(e, d) * x", "eye(d) @ x", "zeros(e, d, d) + a",
    "a + ones()", "eye(d)", "zeros(d)", "ones(2, d) * c", "eye(2 * d) * 3",
    "concat(x, p)", "concat(x, p, x)", "concat(S, M, axis=1)", "concat(S, M, axis=-1)",
    "concat(X, W, axis=0)", "concat(W, W)", "concat(A, P, axis=2)", "concat(x, zeros(2))",
    "concat(p, ones(1))", "concat(W, X, W, axis=-1)", "concat(M, S)", "concat(p, p)",
    "stack(x, p)", "stack(x, p, axis=1)", "stack(x, p, axis=-1)", "stack(a, c)",
    "stack(a, a, 1.0)", "stack(1.0, c)", "stack(S, M, axis=2)", "stack(p, p)",
    "stack(X, W, X, axis=1)", "stack(c, d)", "stack(a, r, axis=-1)",
)


@pytest.mark.parametrize("expr, ref, config", BUILDERS)
def test_builders_concat_stack(expr, ref, config):
    check(expr, ref, config=config)


SPLITS = [
    ("u, w = split(concat(x, p), 2)", "u * 2 + w"),
    ("u, w = split(concat(X, X), 2)", "u - w"),
    ("u, v, w = chunk(concat(S, M, S, axis=1), 3, axis=1)", "u * v + w"),
    ("u, w = split(concat(W, X, axis=1), 2, 1)", "u * w"),
    ("u, w = chunk(concat(A, P), 2, 0)", "w * u"),
    ("u, w = split(concat(p, p), 2)", "u + w"),
    ("u, w = split(concat(S, M, axis=-1), 2, axis=-1)", "u @ w"),
    ("u, w = split(concat(a * p, p), 2 + e // e - 1, axis=0)", "u"),
]


@pytest.mark.parametrize("lines, expr", SPLITS, ids=[s[0] for s in SPLITS])
@pytest.mark.parametrize("config", CONFIGS)
def test_split_chunk_destructuring(lines, expr, config):
    check(expr, None, lines=lines, config=config)


# ---- indexing and transpose ------------------------------------------------------------------
INDEXING = cases(
    "x[1]", "x[-1]", "x[0] * p", "S[0]", "S[:, 1]", "S[-1, 0]", "S[0:2]", "S[1:]", "S[:1]",
    "S[:, :-1]", "S[-2:, :1]", "x[None]", "x[None, :]", "x[:, None]", "S[None]", "S[:, None]",
    "S[:, :, None]", "A[0]", "A[:, 1]", "A[:, :, -1]", "A[:, 0:2]", "A[-1, :, 1:]",
    "W[0]", "M[:, 1]", "P[0, 1]", "p[None]", "M[None, :, :]", "P[:, -1, 1:]", "q[0]",
    "S[1][0]", "A[0][1:][:, 0]", "x[1:][0]", "M[:, 0][1]", "(S @ M)[0, 1:]", "(x + p)[-1]",
    "a[None]", "c[None, None]", "x[:]", "S[:, :]", "S[d - 1]", "x[d // 2]", "M[:d - 1]",
    "x[None][:, None][0, 0]", "X[0][None] * x",
)


@pytest.mark.parametrize("expr, ref, config", INDEXING)
def test_indexing(expr, ref, config):
    check(expr, ref, config=config)


def _reverse_axes(t):
    return t.permute(*reversed(range(t.dim())))


TRANSPOSES = cases(
    ("x.T", lambda v: v.x), ("a.T", lambda v: v.a), ("p.T", lambda v: v.p),
    ("S.T", lambda v: v.S.transpose(0, 1)), ("M.T", lambda v: v.M.transpose(0, 1)),
    ("X.T", lambda v: v.X.transpose(0, 1)), ("W.T", lambda v: v.W.transpose(0, 1)),
    ("A.T", lambda v: _reverse_axes(v.A)), ("P.T", lambda v: _reverse_axes(v.P)),
    ("(A + P).T", lambda v: _reverse_axes(v.A + v.P)), ("S.T.T", lambda v: v.S),
    ("x[:, None].T", lambda v: v.x[None, :]), ("(S @ M).T @ x", lambda v: (v.S @ v.M).T @ v.x),
    ("A.T[0] * G.T", lambda v: _reverse_axes(v.A)[0] * v.G.T),
    ("(W.T @ X).T + M", lambda v: (v.W.T @ v.X).T + v.M),
)


@pytest.mark.parametrize("expr, ref, config", TRANSPOSES)
def test_transpose(expr, ref, config):
    check(expr, ref, config=config)


# ---- dims as values --------------------------------------------------------------------------
DIM_VALUES = cases(
    "x / d", "x * d", "d ** -0.5 * x", "x * (e + d)", "x / (2 * d)", "(x * x + 1) ** (1 / d)",
    "x * (d // 2)", "c * d", "d - x", "-d * p", "S / d ** 0.5", "x * (d * e - 1)",
    "zeros(d) + d", "e * x[0]",
)


@pytest.mark.parametrize("expr, ref, config", DIM_VALUES)
def test_dims_as_values(expr, ref, config):
    check(expr, ref, config=config)


def test_reference_functions_cover_the_language():
    """The reference table names every function of LANGUAGE.md section 6 (guards this file)."""
    wanted = set(UNARY) | {"max", "min", "logaddexp", "where", "sum", "mean", "amax", "logsumexp",
                           "softmax", "dot", "outer", "l2norm", "eye", "zeros", "ones", "concat",
                           "stack", "split", "chunk"}
    assert wanted <= set(FUNCTIONS)
