"""Fuzzing the front end: whatever the text, rcc.compile raises CompileError or returns a class,
and a compiled module either runs or fails with a clear CompileError/ValueError/TypeError.

Bugs these properties found are pinned as plain regression tests at the end of the file.
"""
import re
import traceback

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rcc
from fuzzing import TOKEN
from rcc import parser as rcc_parser

FAST = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- valid seed cells, covering every statement form and most built-ins ----------------------
SEEDS = [
    """# minGRU
cell MinGRU(d_in, d) {
    input x[d_in]
    param Wz[d, d_in], bz[d], Wh[d, d_in], bh[d]
    state h[d]

    z  = sigmoid(Wz @ x + bz)
    h' = (1 - z) * h + z * (Wh @ x + bh)
    output y = h'
}
""",
    """fn gate(W, x, U, h, b) = sigmoid(W @ x + U @ h + b)
fn ifelse(c, a, b) = c * a + (1 - c) * b
cell Lstm(d_in, d = 3) {
    input x[d_in]
    param W[4 * d, d_in] = xavier, U[4 * d, d], b[4 * d] = 0
    state h[d], c[d]
    g = W @ x + U @ h + b
    i, f, o, u = split(g, 4)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(u)
    h' = gate(U[0:d, 0:d], h, U[d:2*d, 0:d], c', b[0:d]) * tanh(c')
    output y = ifelse(0.5, h', c')
    output h'
}
""",
    """cell Delta(K, V) {
    input q[K], k[K], v[V], beta
    state S[V, K]
    kn = l2norm(k)
    S' = S - beta * outer(S @ kn - v, kn)
    output o = S' @ q
}
""",
    """cell Misc(d = 4, n = 2) {
    input x[d], g
    param A[d, d] = eye, s[d] = ones, p0[d] = uniform(-0.1, 0.1)
    state h[d] = p0, m[n, d]
    a = softmax(x) * amax(x) + mean(x, 0) - logsumexp(x)
    for j in 0..n {
        a = a + m[j] * relu(x) + x[j]
    }
    w = where(x > 0, x, -x) ** 2
    h' = tanh(A.T @ h + a[:] + max(w, s) + min(x, 1.5)) / sqrt(d)
    m' = stack(h', h', axis=0)[0:n]
    r = concat(x[0:2], h[:, None][2:d, 0])
    output y = h' + dot(x, s) + sum(r) - exp(-abs(g)); output z = softplus(g) * silu(x) + gelu(x)
}
""",
    """fn f_not(a) = 1 - a
fn f_and(a, b) = a * b
cell Lsrl(n = 3, k) {
    input x, u[k, n]
    state c, v[n], M[k, n] = 1
    param P[n, n] = orthogonal, Q[k, n] = normal(0, 0.02)
    e = eye(n) @ v + zeros(n) + ones(n) * 0.5
    for i in 0..n {
        e = e + f_and(x > i, f_not(c < n)) * P[i, :]
    }
    lo, hi = chunk(concat(e, e), 2)
    c' = c + 1
    v' = lo - hi.T + e[-1] + e[None, :][0] + logaddexp(e, x) + rsqrt(1 + e * e) + mean(M, axis=0)
    M' = M * sign(u) + Q / k + softmax(u) + u @ P.T + e[None, :] * sum(u, 1)[:, None]
    output y = sum(v') + c' - amax(M[0]) + logsumexp(M[1:k, :] @ v)
    output c'
}
""",
]

# Tokens of the language, for building text that lexes but rarely parses.
TOKENS = [
    "cell", "over", "input", "param", "state", "output", "for", "in", "fn", "use", "seq",
    "grid2d", "x", "h", "h'", "d", "W", "sigmoid", "split", "concat", "stack", "sum", "eye",
    "zeros", "None", "0", "1", "2", "0.5", "1e-6", "99999999999", "(", ")", "[", "]", "{", "}",
    ",", ";", "\n", "=", "+", "-", "*", "/", "//", "@", "**", "<", "<=", "==", "!=", ":", "..",
    ".", ".T", "'", "#", "\"common.rnn\"", "axis=", " ",
]

_BUILTINS = ["sigmoid", "tanh", "relu", "silu", "gelu", "exp", "log", "log1p", "expm1", "softplus",
             "logsigmoid", "sqrt", "rsqrt", "abs", "sign", "sin", "cos", "max", "min", "logaddexp",
             "where", "sum", "mean", "amax", "logsumexp", "softmax", "dot", "outer", "l2norm",
             "eye", "zeros", "ones", "concat", "stack", "split", "chunk"]
_OPERATORS = ["+", "-", "*", "/", "//", "@", "**", "<", "<=", ">", ">=", "==", "!=", ".T"]
_NUMBERS = ["0", "1", "-1", "2", "3", "0.0", "1e308", "1e-320", "99999999999999999999",
            "4096", "65536", "1000000000", "10 ** 10 ** 10", "1e999", "9" * 400]


def tokens_of(text):
    return TOKEN.findall(text)


def compile_or_error(text):
    """The property of every fuzz test: a class or a CompileError, nothing else."""
    try:
        return rcc.compile(text)
    except rcc.CompileError as e:
        assert e.message and e.line >= 0 and e.col >= 0
        assert "Traceback" not in str(e)
        return None


# ---- (a) arbitrary text ----------------------------------------------------------------------
@FAST
@given(st.text(max_size=200))
def test_arbitrary_text_gives_compile_error(text):
    compile_or_error(text + "\n")  # the newline keeps a short text from being taken as a path


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_token_soup_gives_compile_error(toks):
    compile_or_error(" ".join(toks) + "\n")


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=40), st.sampled_from(SEEDS), st.data())
def test_tokens_inside_a_cell_body(toks, seed, data):
    lines = seed.split("\n")
    at = data.draw(st.integers(1, len(lines) - 1))
    lines.insert(at, "    " + " ".join(toks))
    compile_or_error("\n".join(lines))


@FAST
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_parser_alone_raises_only_compile_error(text):
    try:
        rcc_parser.parse(text, "fuzz.rnn")
    except rcc.CompileError as e:
        assert e.filename == "fuzz.rnn"


# ---- (b) mutations of valid cells ------------------------------------------------------------
def _identifiers(toks):
    return sorted({t.rstrip("'") for t in toks if re.match(r"[A-Za-z_]", t)})


@st.composite
def mutated_cell(draw, seeds=SEEDS):
    toks = tokens_of(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "number", "rename",
                                     "rename_one", "char", "operator"]))
        i = draw(st.integers(0, len(toks) - 1))
        if kind == "delete":
            del toks[i]
        elif kind == "duplicate":
            toks.insert(i, toks[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        elif kind == "insert":
            toks.insert(i, draw(st.sampled_from(TOKENS)))
        elif kind == "number":
            nums = [k for k, t in enumerate(toks) if t[:1].isdigit()]
            if nums:
                toks[draw(st.sampled_from(nums))] = draw(st.sampled_from(_NUMBERS))
        elif kind == "operator":
            ops = [k for k, t in enumerate(toks) if t in _OPERATORS]
            if ops:
                toks[draw(st.sampled_from(ops))] = draw(st.sampled_from(_OPERATORS))
        elif kind in ("rename", "rename_one") and _identifiers(toks):
            names = _identifiers(toks)
            old = draw(st.sampled_from(names))
            new = draw(st.sampled_from(names + _BUILTINS + [
                "class", "self", "None", "forward", "training", "initial_state", "_x", "lambda",
                "True", "torch", "F", "math", "_rt", "_t", "_N", "args", "kwargs", "seq", "T"]))
            for k, t in enumerate(toks):
                if t.rstrip("'") == old:
                    toks[k] = new + ("'" if t.endswith("'") else "")
                    if kind == "rename_one":
                        break
        elif kind == "char":  # a character-level edit inside one token
            t = toks[i]
            p = draw(st.integers(0, len(t)))
            op = draw(st.sampled_from(["del", "dup", "ins"]))
            c = draw(st.sampled_from(list("'()[]{},;:=+-*/@.#\"\\0 x\t")))
            toks[i] = t[:p] + t[p + 1:] if op == "del" else \
                t[:p] + t[p:p + 1] * 2 + t[p + 1:] if op == "dup" else t[:p] + c + t[p:]
        if not toks:
            toks = ["\n"]
    return "".join(toks)


def _small_enough(text):
    """Run only modules whose sizes are small: every integer literal at most 64."""
    return all(int(n) <= 64 for n in re.findall(r"(?<![\d.eE])\d+(?![\d.eE])", text))


def run_tiny(cls):
    """Instantiate with small dims and run on a [B=1, T=2] input. Allowed failures are the clear
    ones: CompileError (a dim value the cell cannot take), ValueError, TypeError."""
    dims = {name: 3 for name, default, _ in cls.DIMS if default is None}
    topology = getattr(cls, "TOPOLOGY", "seq")
    lead = {"seq": (2,), "dag": (4,), "grid2d": (2, 3)}[topology]
    graph = {"edge_index": torch.tensor([[0, 1, 0], [2, 2, 3]])} if topology == "dag" else {}
    try:
        m = cls(**dims)
        inputs = [torch.randn(1, *lead, *m.shapes[n], dtype=torch.float64) for n in cls.INPUTS]
        out, final = m.double()(*inputs, **graph)
    except rcc.CompileError as e:
        assert e.message
        return
    except (ValueError, TypeError) as e:
        # only rcc's own checks of dims and inputs may raise these, not torch deep inside
        frames = traceback.extract_tb(e.__traceback__)
        assert frames[-1].filename.replace("\\", "/").endswith(
            ("rcc/runtime/module.py", "rcc/runtime/graph.py")), "".join(traceback.format_exception(e))
        return
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(cls.OUTPUTS)
    assert set(final) == set(cls.STATES)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_cell())
def test_mutated_cells_compile_or_fail_clearly_and_run(text):
    cls = compile_or_error(text)
    if cls is not None and _small_enough(text):
        run_tiny(cls)


GRAPH_SEEDS = [
    """cell Tree(d_in, d) over dag {
    input x[d_in]
    param W[4 * d, d_in], U[3 * d, d], U_f[d, d], b[4 * d] = 0
    state h[d], c[d]
    w_i, w_o, w_u, w_f = split(W @ x + b, 4)
    u_i, u_o, u_u = split(U @ sum_pred(h), 3)
    c' = sigmoid(w_i + u_i) * tanh(w_u + u_u) + sum_pred(sigmoid(w_f + U_f @ h) * c)
    h' = sigmoid(w_o + u_o) * tanh(c') + mean_pred(h) - max_pred(c)
    output h'
}
""",
    """cell Plstm(K, V, P = 2) over grid2d {
    input q[K], k[K], v[V], source[P], transition[P, P], mark[P]
    state C[K, V] over edges, h[K] = 0.5
    T = transition / (0.5 + sum(abs(transition), 0))
    C' = sum_pred(T[out_slot, in_slot] * C) + sigmoid(source)[out_slot] * outer(k, v)
    h' = tanh(pred(h, 0) + pred(h, 1) * q)
    output y = sum_pred(sigmoid(mark)[in_slot] * (q @ C)) + dot(q, k) * v
}
""",
]


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_cell(GRAPH_SEEDS))
def test_mutated_graph_cells_compile_or_fail_clearly_and_run(text):
    cls = compile_or_error(text)
    if cls is not None and _small_enough(text):
        run_tiny(cls)


# ---- (c) random expressions over values of every rank, batched or not, and constants -------
_LEAVES = ["x", "g", "W", "v", "h", "S", "d", "2", "0.5", "-1", "x[0]", "W[:, 1]", "S[1:d]",
           "h[None, :]"]
_SUFFIXES = ["[0]", "[:, 0]", "[1:d]", "[None]", "[:, None]", ".T", "[-1]"]


def _expressions():
    def extend(sub):
        return st.one_of(
            st.tuples(st.sampled_from(_BUILTINS[:17]), sub).map(lambda t: f"{t[0]}({t[1]})"),
            st.tuples(sub, st.sampled_from(_OPERATORS[:-1]), sub).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(st.sampled_from(["max", "min", "logaddexp", "dot", "outer"]), sub, sub).map(
                lambda t: f"{t[0]}({t[1]}, {t[2]})"),
            st.tuples(st.sampled_from(["sum", "mean", "amax", "logsumexp"]), sub,
                      st.sampled_from(["", ", 0", ", -1", ", axis=1"])).map(
                lambda t: f"{t[0]}({t[1]}{t[2]})"),
            st.tuples(sub, st.sampled_from(_SUFFIXES)).map(lambda t: t[0] + t[1]),
            st.tuples(sub, sub, sub).map(lambda t: f"where({t[0]}, {t[1]}, {t[2]})"),
            st.tuples(st.sampled_from(["concat", "stack"]), sub, sub,
                      st.sampled_from(["", ", axis=0", ", axis=-1"])).map(
                lambda t: f"{t[0]}({t[1]}, {t[2]}{t[3]})"),
            st.tuples(st.sampled_from(["softmax", "l2norm", "-"]), sub).map(
                lambda t: f"{t[0]}({t[1]})"),
            st.sampled_from(["eye(d)", "zeros(d)", "ones(d, d)", "zeros()"]),
        )
    return st.recursive(st.sampled_from(_LEAVES), extend, max_leaves=8)


@FAST
@given(_expressions(), _expressions(), _expressions())
def test_random_expressions_compile_or_fail_clearly_and_run(a, b, c):
    text = f"""cell E(d = 3) {{
    input x[d], g
    param W[d, d], v[d]
    state h[d], S[d, d]
    a = {a}
    h' = h * sigmoid(sum(a)) + {b}
    S' = S + {c}
    output y = {c}
    output a2 = a
}}
"""
    cls = compile_or_error(text)
    if cls is not None:
        run_tiny(cls)


@pytest.mark.parametrize("seed", SEEDS, ids=["mingru", "lstm", "delta", "misc", "lsrl"])
def test_seeds_compile_and_run(seed):
    run_tiny(rcc.compile(seed))


def test_graph_seeds_run():
    tree, grid = (rcc.compile(s)(3, 3) for s in GRAPH_SEEDS)
    y, final = tree(torch.randn(1, 4, 3), edge_index=torch.tensor([[0, 1, 0], [2, 2, 3]]))
    assert y.shape == (1, 4, 3) and final["c"].shape == (1, 4, 3)
    y, final = grid(*(torch.randn(1, 2, 3, *s) for s in ((3,), (3,), (3,), (2,), (2, 2), (2,))))
    assert y.shape == (1, 2, 3, 3) and final["C"].shape == (1, 2, 3, 2, 3, 3)


# ---- regressions: inputs that crashed the compiler or the generated code before ------------
def _cell(body, header="cell C(d) {"):
    return header + "\n    input x[d]\n    " + body.replace("\n", "\n    ") + "\n}\n"


REGRESSIONS = {
    # the stack() builtin was shadowed by the elaborator's inline call stack (TypeError)
    "stack": (_cell("output y = stack(x, x)"), "ok"),
    # CompileErrors raised in the parser's tree callbacks came out wrapped in lark's VisitError
    "dim default float": ("cell C(d = 0.5) {\n    input x[d]\n    output y = x\n}\n", "error"),
    "kwarg then positional": (_cell("output y = sum(axis=0, x)"), "error"),
    # int('9' * 5000) exceeds Python's digit limit (ValueError); 1e999 printed as `inf` (NameError)
    "huge int": (_cell("output y = x * " + "9" * 5000), "error"),
    "inf literal": (_cell("output y = x * 1e999"), "error"),
    # constants folded by sympy to complex or infinite values broke the printer (TypeError)
    "complex": (_cell("output y = x * sqrt(-1)"), "error"),
    "zoo": (_cell("output y = x * log(d - d)"), "error"),
    "huge power": (_cell("output y = x * 10 ** 10 ** 10"), "error"),
    # a long chain of + overflowed the stack (RecursionError)
    "deep": (_cell("output y = x" + " + x" * 3000), "error"),
    # torch functions do not take Python floats: F.silu(0.5), (1.0 < 2.0).to(...), 0.5.expand
    "silu const": (_cell("output y = x * silu(0.5) + x * (1 < 2)"), "ok"),
    "const output": (_cell("state s\ns' = 0.5\noutput y = 2.0"), "ok"),
    "const stack": (_cell("output y = stack(1.0, d) * sum(x)"), "ok"),
    # an index beyond a symbolic size was an IndexError inside torch at run time
    "index past symbolic size": (_cell("output y = x[5]"), "ok-or-error"),
    "slice past symbolic size": (_cell("output y = x[1:7]"), "ok-or-error"),
    # torch.nn.init raised RuntimeError when the module was built
    "uniform reversed": (_cell("param W[d] = uniform(0.1, -1)\noutput y = x * W"), "error"),
    "float32 overflow": (_cell("param W[d] = 1e308\noutput y = x * W"), "error"),
    # `training` is an instance attribute of nn.Module; a param of that name broke the module
    "training": (_cell("param training[d]\noutput y = x * training"), "error"),
    # Python signatures of the generated module: Cell(self=...), m(initial_state=...)
    "dim self": ("cell C(self) {\n    input x[self]\n    output y = x\n}\n", "error"),
    "input initial_state": (_cell("input initial_state[d]\noutput y = initial_state"), "error"),
    # a loop bound typo used to unroll for ever
    "long loop": (_cell("for j in 0..1000000000 {\n    x = x + 1\n}\noutput y = x"), "error"),
    "d ** big": (_cell("output y = x * d ** 1000000000"), "error"),
    # found by the campaign (tests/fuzzing.py): a vector state beside the matrix with no input
    # term crashed the folding (TypeError); a step affine only once h ** 0 simplifies was called
    # scannable, and the scan's form, read off the IR, still read h (AssertionError)
    "fold without input": ("cell L(K, V) {\n    input q[K], k[K], v[V]\n    state S[K, V], z[K]\n"
                           "    S' = S + outer(k, v)\n    z' = z / k\n"
                           "    output o = (q @ S') / (dot(q, z') + 16)\n}\n", "ok"),
    "h ** 0": (_cell("state h[d]\nh' = h ** sqrt(-expm1(0 * x)) * x\noutput y = h'"), "ok"),
}


@pytest.mark.parametrize("name", REGRESSIONS)
def test_regressions(name):
    text, outcome = REGRESSIONS[name]
    cls = compile_or_error(text)
    assert (cls is None) == (outcome == "error") or outcome == "ok-or-error"
    if cls is not None:
        run_tiny(cls)
