"""Semantics of statements, declarations, states and outputs (LANGUAGE.md sections 3 to 5) on the
torch backend: rebinding, compile-time loops and static dims, fns, `use` imports, shape
expressions, initializers, initial states and `initial_state`, outputs. Each cell runs several
steps with heads and is compared, forward and backward, with a per-element reference step written
here (see semantics_harness)."""
import inspect
import math
import textwrap

import pytest
import torch

import rcc
from semantics_harness import F64, instantiate, run_and_compare


def _sigmoid(t):
    return 1 / (1 + torch.exp(-t))


# ---- statements ------------------------------------------------------------------------------
def test_rebinding_sees_the_newest_binding():
    src = """
    cell Rebind(d) {
        input x[d]
        param W[d, d]
        state h[d]
        a = W @ x
        b = a * 2
        a = tanh(a + h)
        a = a * b
        h' = a
        output y = a + b
        output first = b
    }
    """

    def step(v):
        a = v.W @ v.x
        b = a * 2
        a = torch.tanh(a + v.h)
        a = a * b
        return {"y": a + b, "first": b, "h'": a}

    run_and_compare(instantiate(src, d=3), step, T=3, heads=(2,))


def test_for_loop_with_an_int_bound_unrolls():
    src = """
    cell Loop(d) {
        input x[d]
        param W[3, d]
        state S[3, d], acc
        total = 0 * x
        for j in 0..3 {
            total = total * 0.5 + S[j] * W[j] + j * x
            for k in 0..2 {
                total = total + x[k:k + 1] * (k + 1)
            }
        }
        acc' = acc + sum(total)
        S' = S + x[None, :] * W
        output y = total
    }
    """

    def step(v):
        total = 0 * v.x
        for j in range(3):
            total = total * 0.5 + v.S[j] * v.W[j] + j * v.x
            for k in range(2):
                total = total + v.x[k:k + 1] * (k + 1)
        return {"y": total, "acc'": v.acc + total.sum(), "S'": v.S + v.x[None, :] * v.W}

    run_and_compare(instantiate(src, d=3), step, T=3, heads=(2,))


STATIC_LOOP = """
cell Static(d, n = 2) {
    input x[d]
    param W[n, d]
    state h[n, d]
    acc = 0 * x
    for j in 0..n {
        acc = acc + h[j] * W[j]
    }
    h' = tanh(h + x[None, :] * acc)
    output y = acc
}
"""


def _static_step(n):
    def step(v):
        acc = 0 * v.x
        for j in range(n):
            acc = acc + v.h[j] * v.W[j]
        return {"y": acc, "h'": torch.tanh(v.h + v.x[None, :] * acc)}
    return step


def test_loop_over_a_dim_with_a_default_respecializes():
    Cell = rcc.compile(STATIC_LOOP)
    assert Cell.STATIC_DIMS == {"n": 2}
    m2 = instantiate(STATIC_LOOP, d=3)
    assert m2.dims == {"d": 3, "n": 2}
    run_and_compare(m2, _static_step(2), T=2, heads=(2,))
    # another value of n: a new specialization, generated transparently
    m4 = instantiate(STATIC_LOOP, d=3, n=4)
    assert type(m4).STATIC_DIMS == {"n": 4} and m4.W.shape == (4, 3)
    run_and_compare(m4, _static_step(4), T=2, heads=(2,))
    assert isinstance(m4, torch.nn.Module) and type(m4).CELL == "Static"


def test_loop_over_a_dim_without_default_generates_when_instantiated():
    src = STATIC_LOOP.replace("n = 2", "n")
    m = instantiate(src, d=2, n=3)
    assert type(m).STATIC_DIMS == {"n": 3}
    run_and_compare(m, _static_step(3), T=2, heads=())
    with pytest.raises(rcc.CompileError, match="'n' is not bound"):
        rcc.compile(src)(d=2)


FNS = """
fn ifelse(c, a, b) = c * a + (1 - c) * b
fn gate(W, x, h) = sigmoid(W @ x + h)
fn row(M, j) = M[j] * (j + 1)
fn mix(W, x, h) = ifelse(gate(W, x, h), x, h)
fn scaled(x, d) = x / d
"""


def test_fns_nested_and_with_loop_variables():
    src = FNS + """
    cell Fns(d) {
        input x[d]
        param W[d, d], M[2, d]
        state h[d]
        hh = h
        for j in 0..2 {
            hh = hh + row(M, j)
        }
        h' = mix(W, x, hh)
        output y = scaled(h', d) + gate(W, x, 0)
    }
    """

    def step(v):
        h = v.h
        for j in range(2):
            h = h + v.M[j] * (j + 1)
        g = _sigmoid(v.W @ v.x + h)
        nxt = g * v.x + (1 - g) * h
        return {"h'": nxt, "y": nxt / v.d + _sigmoid(v.W @ v.x)}

    run_and_compare(instantiate(src, d=3), step, T=3, heads=(2,))


def test_use_relative_file_imports_fns(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "common.rnn").write_text('use "gates.rnn"\n' + FNS.replace("fn gate", "fn gate_unused"))
    (lib / "gates.rnn").write_text("fn gate(W, x, h) = sigmoid(W @ x + h)\n")
    cell = """
    use "lib/common.rnn"
    cell Used(d) {
        input x[d]
        param W[d, d]
        state h[d]
        h' = mix(W, x, h)
        output y = h'
    }
    """
    main = tmp_path / "main.rnn"
    main.write_text(textwrap.dedent(cell))

    def step(v):
        g = _sigmoid(v.W @ v.x + v.h)
        nxt = g * v.x + (1 - g) * v.h
        return {"h'": nxt, "y": nxt}

    run_and_compare(instantiate(str(main), d=2), step, T=2, heads=(3,))
    # source text: the path is relative to the working directory
    monkeypatch.chdir(tmp_path)
    run_and_compare(instantiate(cell, d=2), step, T=2, heads=())


def test_use_stdlib_module_by_name():
    m = instantiate("use mingru\n", cell="MinGRU", d_in=2, d=3)

    def step(v):
        z = _sigmoid(v.Wz @ v.x + v.bz)
        nxt = (1 - z) * v.h + z * (v.Wh @ v.x + v.bh)
        return {"y": nxt, "h'": nxt}

    run_and_compare(m, step, T=3, heads=(2,))


def test_shape_expressions_of_dims():
    src = """
    cell Shapes(d) {
        input x[2 * d + 1]
        param W[4 * d, 2 * d + 1], b[4 * d]
        state h[d // 2], c[d]
        i, f, g, o = split(W @ x + b, 4)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = (sigmoid(o) * tanh(c'))[0:d // 2] + zeros(d // 2)
        output y = concat(h', c') @ ones(d // 2 + d) + sum(eye(d + 1))
    }
    """
    m = instantiate(src, d=5)
    assert m.shapes["x"] == (11,) and m.W.shape == (20, 11) and m.shapes["h"] == (2,)

    def step(v):
        i, f, g, o = torch.split(v.W @ v.x + v.b, v.d)
        c = _sigmoid(f) * v.c + _sigmoid(i) * torch.tanh(g)
        h = (_sigmoid(o) * torch.tanh(c))[: v.d // 2]
        return {"c'": c, "h'": h, "y": torch.cat([h, c]).sum() + (v.d + 1)}

    run_and_compare(m, step, T=2, heads=(2,))
    with pytest.raises(rcc.CompileError):
        rcc.compile(src)(d=1)  # h[d // 2] would be empty


# ---- initializers ----------------------------------------------------------------------------
def test_param_initializers_statistics():
    src = """
    cell Init(n, k = 3) {
        input x[n]
        param Wd[60, n], cd, Z[n] = zeros, O[n] = ones, N0[n] = 0, Num[n] = 2.5
        param Neg = -1, E[k, n] = eye, U[60, n] = uniform(-0.3, 0.7)
        param G[80, n] = normal(1.5, 0.25), X[n, 60] = xavier, Q[k, n] = orthogonal
        param Qt[n, k] = orthogonal, Dd[n] = uniform(-1 / n, 1 / n), Dn[60, n] = normal(n, 1 / n)
        param Dc[k] = n, Ddim[n] = k * 2
        output y = x
    }
    """
    n = 50
    m = rcc.compile(src)(n=n).double()
    P = dict(m.named_parameters())
    s = 1 / math.sqrt(n)
    assert P["Wd"].abs().max() <= s and P["Wd"].abs().max() > 0.9 * s
    assert abs(P["Wd"].mean()) < 0.05 * s and abs(P["Wd"].var() - s * s / 3) < 0.1 * s * s
    assert P["cd"].shape == () and -1 <= P["cd"] <= 1
    assert (P["Z"] == 0).all() and (P["O"] == 1).all() and (P["N0"] == 0).all()
    assert (P["Num"] == 2.5).all() and P["Neg"].item() == -1
    assert torch.equal(P["E"], torch.eye(3, n, dtype=F64))
    assert P["U"].min() >= -0.3 and P["U"].max() <= 0.7 and abs(P["U"].mean() - 0.2) < 0.03
    assert abs(P["G"].mean() - 1.5) < 0.02 and abs(P["G"].std() - 0.25) < 0.02
    bound = math.sqrt(6 / (n + 60))
    assert P["X"].abs().max() <= bound and P["X"].abs().max() > 0.9 * bound
    torch.testing.assert_close(P["Q"] @ P["Q"].T, torch.eye(3, dtype=F64))
    torch.testing.assert_close(P["Qt"].T @ P["Qt"], torch.eye(3, dtype=F64))
    assert P["Dd"].abs().max() <= 1 / n
    assert abs(P["Dn"].mean() - n) < 0.01 and abs(P["Dn"].std() - 1 / n) < 0.002
    assert (P["Dc"] == n).all() and (P["Ddim"] == 6).all()
    before = P["Wd"].detach().clone()
    m.reset_parameters()
    assert not torch.equal(before, m.Wd) and m.Wd.abs().max() <= s


def test_default_initializer_uses_the_last_axis():
    m = rcc.compile("cell C(d) { input x[d]\n param W[2, 3, 400], v[9]\n output y = x }")(d=1)
    assert m.W.abs().max() <= 1 / 20 and m.W.abs().max() > 0.9 / 20
    assert m.v.abs().max() <= 1 / 3


# ---- states ----------------------------------------------------------------------------------
STATE_INITS = """
cell States(d) {
    input x[d]
    param P[d, d], p0 = 0.5
    state z[d], zz[d] = 0, num[d] = 0.1, neg = -2, o[d] = ones, I[d, d] = eye, L[d, d] = P
    state ld = d, kept[d] = 1.5, sc = p0
    z' = z + x
    zz' = zz * 0.5 + x
    num' = num * x
    neg' = neg + sum(x)
    o' = o * 2
    I' = I @ P + x[:, None]
    L' = L * 0.5 + outer(x, x)
    ld' = ld * sum(x)
    sc' = sc * 2 + 1
    output y = z' + num' + neg' + ld + kept + sc'
    output mats = I' + L'
}
"""


def _state_step(v):
    res = {"z'": v.z + v.x, "zz'": v.zz * 0.5 + v.x, "num'": v.num * v.x,
           "neg'": v.neg + v.x.sum(), "o'": v.o * 2, "I'": v.I @ v.P + v.x[:, None],
           "L'": v.L * 0.5 + v.x[:, None] * v.x[None, :], "ld'": v.ld * v.x.sum(),
           "sc'": v.sc * 2 + 1}
    res["y"] = res["z'"] + res["num'"] + res["neg'"] + v.ld + v.kept + res["sc'"]
    res["mats"] = res["I'"] + res["L'"]
    return res


def test_state_initial_values_from_declarations():
    m = instantiate(STATE_INITS, d=3)
    d = 3
    defaults = {"z": torch.zeros(d), "zz": torch.zeros(d), "num": torch.full((d,), 0.1, dtype=F64),
                "neg": -2.0, "o": torch.ones(d), "I": torch.eye(d), "L": m.P, "ld": float(d),
                "kept": torch.full((d,), 1.5), "sc": m.p0}
    # the learned initial states L = P and sc = p0 get gradients through run_and_compare
    _, final = run_and_compare(m, _state_step, given=(), defaults=defaults, T=3, heads=(2,))
    assert final["kept"].shape == (2, 2, 3) and (final["kept"] == 1.5).all()
    # float64 all the way: 0.1 is not rounded through float32
    y, final = m(torch.ones(1, 1, d, dtype=F64))
    assert final["num"][0, 0].item() == 0.1
    # p0 is used only as the initial value of sc: the gradient reaches it through the state
    (grad,) = torch.autograd.grad(final["sc"].sum(), m.p0)
    assert grad.item() == 2.0


def test_initial_state_overrides_some_states_only():
    m = instantiate(STATE_INITS, d=2)
    given = ("z", "num", "L", "sc")
    defaults = {"zz": torch.zeros(2), "neg": -2.0, "o": torch.ones(2), "I": torch.eye(2),
                "ld": 2.0, "kept": torch.full((2,), 1.5)}
    run_and_compare(m, _state_step, given=given, defaults=defaults, T=2, B=3, heads=(2, 1))


def test_state_without_update_keeps_value_and_update_by_unbatched_value():
    src = """
    cell Keep(d) {
        input x[d]
        param W[d, d], b[d]
        state kept[d], S[d, d], u[d], k, kd
        S' = W @ W.T
        u' = b * 2 + k
        k' = 1.5
        kd' = d
        output y = kept + x
        output z = S[0] + u + k * kd
    }
    """

    def step(v):
        return {"S'": v.W @ v.W.T, "u'": v.b * 2 + v.k, "k'": 1.5, "kd'": float(v.d),
                "y": v.kept + v.x, "z": v.S[0] + v.u + v.k * v.kd}

    _, final = run_and_compare(instantiate(src, d=3), step, T=3, heads=(2,))
    assert final["S"].shape == (2, 2, 3, 3)


def test_state_swap_and_outputs_of_next_values():
    src = """
    cell Swap(d) {
        input x[d]
        state a[d], b[d], c[d]
        a' = b
        b' = a + x
        c' = c
        output ya = a'
        output yb = b'
        output old = a
        output yc = c'
    }
    """

    def step(v):
        return {"a'": v.b, "b'": v.a + v.x, "c'": v.c, "ya": v.b, "yb": v.a + v.x, "old": v.a,
                "yc": v.c}

    run_and_compare(instantiate(src, d=2), step, T=4, heads=(2,))


# ---- outputs ---------------------------------------------------------------------------------
def test_outputs_in_declaration_order_and_shapes():
    src = """
    cell Outs(d) {
        input x[d], a
        param W[d, d], p[d], c
        state h[d], S[d, d]
        h' = tanh(W @ x + h * a)
        output scalar = sum(h') * a
        output h'
        output mat = outer(h', x) + S
        output fixed = W @ W
        output pscalar = c * 2
        output konst = 2.5
        output dim = d
        output inp = x
        output st = S
        output again = h'
    }
    """

    def step(v):
        h = torch.tanh(v.W @ v.x + v.h * v.a)
        return {"h'": h, "scalar": h.sum() * v.a, "h": h, "mat": h[:, None] * v.x[None, :] + v.S,
                "fixed": v.W @ v.W, "pscalar": v.c * 2, "konst": 2.5, "dim": float(v.d),
                "inp": v.x, "st": v.S, "again": h}

    m = instantiate(src, d=3)
    assert m.OUTPUTS == ("scalar", "h", "mat", "fixed", "pscalar", "konst", "dim", "inp", "st",
                         "again")
    out, _ = run_and_compare(m, step, B=2, T=3, heads=(2,))
    shapes = [tuple(o.shape) for o in out]
    assert shapes == [(2, 3, 2), (2, 3, 2, 3), (2, 3, 2, 3, 3), (2, 3, 2, 3, 3), (2, 3, 2),
                      (2, 3, 2), (2, 3, 2), (2, 3, 2, 3), (2, 3, 2, 3, 3), (2, 3, 2, 3)]
    out, _ = m(torch.randn(2, 1, 3, dtype=F64), torch.randn(2, 1, dtype=F64))  # no heads
    assert out[3].shape == (2, 1, 3, 3) and out[5].shape == (2, 1)


def test_single_output_is_a_tensor_and_states_a_dict():
    m = instantiate("cell One(d) { input x[d]\n state h[d]\n h' = h + x\n output h' }", d=2)
    y, final = m(torch.randn(3, 2, 2, dtype=F64))
    assert torch.is_tensor(y) and y.shape == (3, 2, 2) and set(final) == {"h"}


def test_final_states_are_plain_tensors():
    """States never updated, or updated by a param expression, come back writable."""
    src = "cell W(d) { input x[d]\n param P[d]\n state a[d] = 1, b[d]\n b' = P * 2\n output y = x }"
    m = instantiate(src, d=2)
    _, final = m(torch.randn(2, 3, 4, 2, dtype=F64))
    for s in final.values():
        assert s.shape == (2, 4, 2) and s.is_contiguous()
        s.add_(1.0)


def test_generated_code_is_readable():
    """Param-only values are computed before the time loop, W @ x reads as a linear layer, and
    lines stay within the house limit (the span lines quote the source and are exempt)."""
    src = """
    cell Readable(d_in, d) {
        input x[d_in], gate
        param W[d, d_in], U[d, d], b[d]
        state h[d], S[d, d]
        A = U @ U.T + eye(d)
        pre = W @ x + A @ h + b
        h' = tanh(pre) * sigmoid(gate) + (1 - sigmoid(gate)) * h + logaddexp(pre, 0) * softplus(pre - b)
        S' = S * sigmoid(gate) + outer(h', h') - where(S > 0, S, 0) * relu(pre)[:, None]
        output y = h' @ S' + sum(A, 1)
    }
    """
    m = instantiate(src, d_in=2, d=3)
    code = inspect.getsource(type(m))
    loop = code.index("for _t in range(_T):")
    assert code.index("A = ") < loop and "A = U @ U.mT + torch.eye(d" in code
    assert "F.linear(x, W)" in code
    long = [ln for ln in code.splitlines() if len(ln) > 110 and "_rt.span(" not in ln]
    assert not long, long

    def step(v):
        A = v.U @ v.U.T + torch.eye(3, dtype=F64)
        pre = v.W @ v.x + A @ v.h + v.b
        g = _sigmoid(v.gate)
        # softplus as log(1 + e^x) without overflow (log1p(exp(x)) is inf past x = 709)
        h = torch.tanh(pre) * g + (1 - g) * v.h + torch.logaddexp(pre, 0 * pre) * torch.logaddexp(
            pre - v.b, 0 * pre)
        S = v.S * g + h[:, None] * h[None, :] - torch.where(v.S > 0, v.S, 0 * v.S) * torch.relu(
            pre)[:, None]
        return {"h'": h, "S'": S, "y": h @ S + A.sum(1)}

    run_and_compare(m, step, T=3, heads=(2,))


# ---- whole recurrences -----------------------------------------------------------------------
def test_delta_rule_with_matrix_state():
    src = """
    cell Delta(K, V) {
        input q[K], k[K], v[V], beta
        param scale = 1
        state S[V, K]
        kn = l2norm(k)
        b = sigmoid(beta)
        S' = S - b * outer(S @ kn - v, kn)
        output o = S' @ q * scale * K ** -0.5
    }
    """

    def step(v):
        kn = v.k / torch.sqrt((v.k * v.k).sum() + 1e-6)
        b = _sigmoid(v.beta)
        S = v.S - b * (v.S @ kn - v.v)[:, None] * kn[None, :]
        return {"S'": S, "o": S @ v.q * v.scale * v.K ** -0.5}

    run_and_compare(instantiate(src, K=3, V=2), step, B=2, T=4, heads=(2,))
    run_and_compare(instantiate(src, K=1, V=1), step, B=1, T=1, heads=())
