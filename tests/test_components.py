"""Block fns (components: fns with their own states and params, fresh per use), state initial
values computed from numbers and dims, and the built-in constant pi (LANGUAGE.md sections 3-6,
docs/language.md "Components"), on backends torch and cpp (plan sequential), in float64.

A block fn is `fn f(a) { STATEMENTS; EXPR }`: its value is its last line, an expression alone.
"""
import math

import numpy as np
import pytest
import torch

import rcc
from conftest import cell_inputs, run_with_grads

BACKENDS = ["torch", "cpp"]

PARTS = """\
fn acc(x) {
    state s = 0
    s' = s + x
    s'
}
fn leaky(x) {
    param w = 0.5
    state h = 0
    h' = w * h + x
    h'
}
fn pair(x) {
    state k = 1
    k' = 2 * k
    acc(x) + acc(k')
}
fn rotor(n) {
    state c[2] = stack(cos(2 * pi / n), -sin(2 * pi / n))
    angle = 2 * pi / n
    c' = stack(cos(angle) * c[0] - sin(angle) * c[1], sin(angle) * c[0] + cos(angle) * c[1])
    c'
}
cell Parts(n) {
    input x
    output a = acc(x)
    output b = acc(2 * x)
    output p = pair(x)
    total = 0
    for i in 0..n {
        total = total + leaky(x * (i + 1))
    }
    output l = total
    output r = rotor(n)
}
"""
N = 2  # the dim n of Parts: two uses of leaky in the for loop
# declaration order: acc's two uses, pair's own state then the two accs it calls, the loop's two
# leakies, the rotor
STATES = ["acc_s", "acc_2_s", "pair_k", "acc_3_s", "acc_4_s", "leaky_h", "leaky_2_h", "rotor_c"]
PARAMS = ["leaky_w", "leaky_2_w"]


def _f64(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _parts_reference(x, w, init):
    """Parts stepped in numpy: x [B, T], w the two leaky params, init a dict of initial states
    (numpy, [B] or [B, 2]). Returns the outputs a, b, p, l [B, T], r [B, T, 2] and the finals."""
    B, T = x.shape
    s = {k: np.array(v, dtype=np.float64, copy=True) for k, v in init.items()}
    a, b, p, l = (np.zeros((B, T)) for _ in range(4))
    r = np.zeros((B, T, 2))
    ang = 2 * math.pi / N
    for t in range(T):
        s["acc_s"] = s["acc_s"] + x[:, t]
        a[:, t] = s["acc_s"]
        s["acc_2_s"] = s["acc_2_s"] + 2 * x[:, t]
        b[:, t] = s["acc_2_s"]
        s["pair_k"] = 2 * s["pair_k"]
        s["acc_3_s"] = s["acc_3_s"] + x[:, t]
        s["acc_4_s"] = s["acc_4_s"] + s["pair_k"]
        p[:, t] = s["acc_3_s"] + s["acc_4_s"]
        s["leaky_h"] = w[0] * s["leaky_h"] + x[:, t] * 1
        s["leaky_2_h"] = w[1] * s["leaky_2_h"] + x[:, t] * 2
        l[:, t] = s["leaky_h"] + s["leaky_2_h"]
        c = s["rotor_c"]
        s["rotor_c"] = np.stack([math.cos(ang) * c[:, 0] - math.sin(ang) * c[:, 1],
                                 math.sin(ang) * c[:, 0] + math.cos(ang) * c[:, 1]], axis=-1)
        r[:, t] = s["rotor_c"]
    return (a, b, p, l, r), s


def _default_init(B):
    ang = 2 * math.pi / N
    init = {k: np.zeros(B) for k in STATES}
    init["pair_k"] = np.ones(B)
    init["rotor_c"] = np.tile([math.cos(ang), -math.sin(ang)], (B, 1))
    return init


_MODULES = {}


def _parts(backend):
    """One Parts module per backend (the cpp kernel is built once), float64, w = (0.5, -0.25)."""
    if backend not in _MODULES:
        m = rcc.compile(PARTS, backend=backend)(n=N).double()
        assert hasattr(m, "_kernel") == (backend == "cpp")  # the C++ kernel runs the cpp module
        with torch.no_grad():
            m.leaky_2_w.fill_(-0.25)
        _MODULES[backend] = m
    return _MODULES[backend]


def _int_inputs(B=2, T=5, seed=0):
    # small integers: every sum and product below is exact in float64
    return np.random.default_rng(seed).integers(-3, 4, size=(B, T)).astype(np.float64)


# ---- components: fresh states and params per use --------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_uses_of_a_block_fn_are_independent(backend):
    m = _parts(backend)
    x = _int_inputs()
    (a, b, p, l, r), final = m(_f64(x))
    assert list(final) == STATES and list(m.STATES) == STATES
    # acc(x) and acc(2 * x): two states, two running sums
    assert torch.equal(a, _f64(np.cumsum(x, axis=1)))
    assert torch.equal(b, _f64(np.cumsum(2 * x, axis=1)))
    assert torch.equal(final["acc_s"], _f64(x.sum(1)))
    assert torch.equal(final["acc_2_s"], _f64(2 * x.sum(1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_fn_calling_block_fns_gets_nested_copies(backend):
    m = _parts(backend)
    x = _int_inputs(T=6)
    (a, b, p, l, r), final = m(_f64(x))
    # pair's own k doubles each step (2, 4, 8, ...); its first acc sums x, its second sums k'
    k = 2.0 ** np.arange(1, 7)
    assert torch.equal(p, _f64(np.cumsum(x, axis=1) + np.cumsum(k)[None]))
    assert torch.equal(final["pair_k"], _f64([64.0, 64.0]))
    assert torch.equal(final["acc_3_s"], _f64(x.sum(1)))  # independent of acc_s, the same sum
    assert torch.equal(final["acc_4_s"], _f64([k.sum()] * 2))
    # the nested copies are numbered after the uses at the top level
    assert [s for s in final if s.startswith("acc")] == ["acc_s", "acc_2_s", "acc_3_s", "acc_4_s"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_fn_inside_a_for_loop_gets_a_copy_per_iteration(backend):
    m = _parts(backend)
    assert [n for n, _ in m.named_parameters()] == PARAMS
    x = _int_inputs(T=4)
    (a, b, p, l, r), final = m(_f64(x))
    want, ref = _parts_reference(x, (0.5, -0.25), _default_init(2))
    # w = 0.5 and -0.25 are powers of two times small integers: exact
    assert torch.equal(l, _f64(want[3]))
    assert torch.equal(final["leaky_h"], _f64(ref["leaky_h"]))
    assert torch.equal(final["leaky_2_h"], _f64(ref["leaky_2_h"]))
    assert not torch.equal(final["leaky_h"], final["leaky_2_h"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_state_overrides_a_components_states(backend):
    m = _parts(backend)
    x = _int_inputs(T=3, seed=1)
    given = {"acc_2_s": np.array([10.0, -7.0]), "pair_k": np.array([3.0, 0.5]),
             "leaky_2_h": np.array([4.0, 8.0]), "rotor_c": np.array([[0.0, 1.0], [1.0, 0.0]])}
    (a, b, p, l, r), final = m(_f64(x), initial_state={k: _f64(v) for k, v in given.items()})
    want, ref = _parts_reference(x, (0.5, -0.25), _default_init(2) | given)
    for got, w in zip((a, b, p, l), want):
        assert torch.equal(got, _f64(w))
    # the rotor starts from the given (0, 1) and (1, 0), not from its computed initial value
    torch.testing.assert_close(r, _f64(want[4]), rtol=0, atol=1e-15)
    assert torch.equal(b[:, 0], _f64(given["acc_2_s"] + 2 * x[:, 0]))
    for k in STATES:
        torch.testing.assert_close(final[k], _f64(ref[k]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_of_a_block_fn_is_a_module_parameter_with_gradient(backend):
    m = _parts(backend)
    params = dict(m.named_parameters())
    assert set(params) == set(PARAMS) and all(p.requires_grad for p in params.values())
    x = _int_inputs(T=5, seed=2)
    (a, b, p, l, r), _ = m(_f64(x))
    m.zero_grad()
    l.sum().backward()
    # d/dw of sum_t h_t for h_t = w h_{t-1} + c x_t: g_t = h_{t-1} + w g_{t-1}
    for name, w, c in (("leaky_w", 0.5, 1), ("leaky_2_w", -0.25, 2)):
        h, g, total = np.zeros(2), np.zeros(2), np.zeros(2)
        for t in range(x.shape[1]):
            h, g = w * h + c * x[:, t], h + w * g
            total += g
        assert params[name].grad is not None
        torch.testing.assert_close(params[name].grad, _f64(total.sum()), rtol=1e-13, atol=0)
    assert float(params["leaky_w"].grad) != 0 and float(params["leaky_2_w"].grad) != 0
    m.zero_grad()


def test_training_a_component_param_lowers_the_loss():
    m = rcc.compile(PARTS, backend="torch")(n=N).double()
    x = _f64(_int_inputs(T=6, seed=3))
    target = torch.zeros(2, 6, dtype=torch.float64)
    opt = torch.optim.SGD([m.leaky_w, m.leaky_2_w], lr=1e-3)
    losses = []
    for _ in range(5):
        (_, _, _, l, _), _ = m(x)
        loss = ((l - target) ** 2).mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert float(m.leaky_w.detach()) != 0.5  # the param moved


def test_backward_through_components_torch_matches_cpp():
    mt, mc = _parts("torch"), _parts("cpp")
    mc.load_state_dict(mt.state_dict())
    xs, init = cell_inputs(mt, B=2, T=6, heads=())
    tensors_t, grads_t = run_with_grads(mt, xs, init)
    xs_c = [x.detach().clone().requires_grad_() for x in xs]
    init_c = {k: v.detach().clone().requires_grad_() for k, v in init.items()}
    tensors_c, grads_c = run_with_grads(mc, xs_c, init_c)
    for a, b in zip(tensors_t, tensors_c):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert len(grads_t) == len(grads_c) == 1 + len(STATES) + len(PARAMS)
    for a, b in zip(grads_t, grads_c):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert all(float(g.abs().sum()) > 0 for g in grads_t[-len(PARAMS):])  # the params get some


def test_a_copys_name_skips_a_name_the_cell_already_binds():
    src = ("fn acc(v) {\n    state s = 0\n    s' = s + v\n    s'\n}\n"
           "cell C() {\n    input x\n    acc_s = 3 * x\n    output y = acc(x)\n"
           "    output z = acc_s\n}\n")
    (y, z), final = rcc.compile(src)().double()(_f64([[1.0, 2.0, 3.0]]))
    assert list(final) == ["acc_2_s"]  # acc_s is the cell's local
    assert torch.equal(y, _f64([[1.0, 3.0, 6.0]]))
    assert torch.equal(z, _f64([[3.0, 6.0, 9.0]]))


# ---- initial values computed from numbers and dims ------------------------------------------

INITS = """\
cell Inits(n) {
    input x
    state c[2] = stack(cos(2 * pi / n), -sin(2 * pi / n))
    state e[2, 3] = stack(1, 2, 3) * n
    state d[3] = 2 * pi / n
    c' = c + x
    e' = e + x
    d' = d + x
    output y = c'
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_starts_from_values_computed_from_numbers_and_dims(backend):
    n = 5
    m = rcc.compile(INITS, backend=backend)(n=n).double()
    x = torch.zeros(2, 1, dtype=torch.float64)
    y, final = m(x)
    c0 = torch.tensor([math.cos(2 * math.pi / n), -math.sin(2 * math.pi / n)],
                      dtype=torch.float64)
    torch.testing.assert_close(final["c"], c0.expand(2, 2), rtol=0, atol=1e-15)
    torch.testing.assert_close(y[:, 0], c0.expand(2, 2), rtol=0, atol=1e-15)
    # a smaller value broadcasts: the rows of e are (1, 2, 3) * n
    assert torch.equal(final["e"], torch.tensor([[5.0, 10.0, 15.0]] * 2,
                                                dtype=torch.float64).expand(2, 2, 3))
    torch.testing.assert_close(final["d"], torch.full((2, 3), 2 * math.pi / n,
                                                      dtype=torch.float64), rtol=0, atol=1e-15)
    # initial_state= wins over the computed values
    given = {"c": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64),
             "e": torch.zeros(2, 2, 3, dtype=torch.float64),
             "d": torch.ones(2, 3, dtype=torch.float64)}
    y, final = m(x + 1, initial_state=given)
    assert torch.equal(final["c"], given["c"] + 1)
    assert torch.equal(final["e"], given["e"] + 1)
    assert torch.equal(final["d"], given["d"] + 1)


def test_computed_initial_value_follows_the_dim():
    cls = rcc.compile(INITS)
    for n in (1, 3, 4):
        _, final = cls(n=n).double()(torch.zeros(1, 1, dtype=torch.float64))
        want = torch.tensor([[math.cos(2 * math.pi / n), -math.sin(2 * math.pi / n)]],
                            dtype=torch.float64)
        torch.testing.assert_close(final["c"], want, rtol=0, atol=1e-15)


def _compile_error(src) -> rcc.CompileError:
    with pytest.raises(rcc.CompileError) as info:
        rcc.compile(src)
    return info.value


@pytest.mark.parametrize("decl, what", [
    ("state c = 2 * x", "reads input 'x'"),
    ("param q = 1; state c = q * 2", "reads param 'q'"),
    ("state h = 1; state c = h * 2", "reads state 'h'"),
])
def test_initial_value_may_not_read_inputs_states_or_params(decl, what):
    err = _compile_error(f"cell C(n) {{\n    input x\n    {decl}\n    output y = x + c\n}}\n")
    assert err.line == 3
    assert what in err.message and "numbers and dims only" in err.message


def test_initial_value_of_a_components_state_may_not_read_its_argument_when_an_input():
    src = ("fn f(v) {\n    state s = 1 * v\n    s' = s\n    s'\n}\n"
           "cell C() {\n    input x\n    output y = f(x)\n}\n")
    err = _compile_error(src)
    assert err.line == 8  # the use; the note points at the declaration in the fn
    assert "state 'f_s' reads input 'x'" in err.message
    assert [s.line for _, s in err.notes] == [2]


def test_initial_value_shape_mismatch():
    err = _compile_error("cell C() {\n    input x\n    state c[2] = stack(1, 2, 3)\n"
                         "    output y = x + c\n}\n")
    assert err.line == 3
    assert "shape mismatch: state 'c' is [2] but its initial value is [3]" in err.message


def test_initial_value_shape_must_be_fixed_numbers():
    err = _compile_error("cell C(n) {\n    input x\n    state c[n] = cos(2 * pi / n) + zeros(n)\n"
                         "    output y = x + sum(c)\n}\n")
    assert err.line == 3
    assert "shape must be fixed numbers" in err.message and "[n]" in err.message


def test_a_scalar_constant_of_dims_still_fills_a_state_of_any_shape():
    # the contrast to the error above: a scalar constant expression fills every entry
    m = rcc.compile("cell C(n) {\n    input x\n    state c[n] = cos(2 * pi / n)\n"
                    "    output y = x + sum(c)\n}\n")(n=3).double()
    _, final = m(torch.zeros(1, 1, dtype=torch.float64))
    torch.testing.assert_close(final["c"], torch.full((1, 3), -0.5, dtype=torch.float64),
                               rtol=0, atol=1e-15)


# ---- pi ---------------------------------------------------------------------------------------

def _run_scalar(src, **dims):
    m = rcc.compile(src)(**dims).double()
    out, _ = m(torch.ones(1, 2, dtype=torch.float64))
    return out


def test_pi_is_a_builtin_constant():
    out = _run_scalar("cell C() {\n    input x\n    output y = x * pi\n}\n")
    assert torch.equal(out, torch.full((1, 2), math.pi, dtype=torch.float64))


def test_pi_shadowed_by_a_local_from_its_binding_on():
    y, z = _run_scalar("cell C() {\n    input x\n    output y = x * pi\n    pi = 3\n"
                       "    output z = x * pi\n}\n")
    assert torch.equal(y, torch.full((1, 2), math.pi, dtype=torch.float64))
    assert torch.equal(z, torch.full((1, 2), 3.0, dtype=torch.float64))


def test_pi_shadowed_by_a_dim_an_input_and_an_fn_parameter():
    out = _run_scalar("fn f(pi) = pi * 2\ncell C(pi) {\n    input x\n"
                      "    output y = x * pi + f(1)\n}\n", pi=3)
    assert torch.equal(out, torch.full((1, 2), 5.0, dtype=torch.float64))
    out = _run_scalar("cell C() {\n    input pi\n    output y = pi * 2\n}\n")
    assert torch.equal(out, torch.full((1, 2), 2.0, dtype=torch.float64))


def test_an_fn_does_not_see_the_callers_pi():
    # a local pi of the cell is not visible inside an fn: there pi is the constant again
    out = _run_scalar("fn g(v) {\n    v * pi\n}\ncell C() {\n    input x\n    pi = 3\n"
                      "    output y = g(x) + pi\n}\n")
    assert torch.equal(out, torch.full((1, 2), math.pi + 3, dtype=torch.float64))


# ---- errors: block fns ------------------------------------------------------------------------

def _use_f(fn_lines, cell_extra=""):
    """`fn f(x) { ... }` then a cell whose line 3 + len(fn_lines) + 1 uses f(x)."""
    body = "".join(f"    {ln}\n" for ln in fn_lines)
    return (f"fn f(x) {{\n{body}}}\ncell C() {{\n    input x\n{cell_extra}"
            "    output y = f(x)\n}\n")


def test_block_fn_cannot_declare_an_input():
    err = _compile_error(_use_f(["input z", "x"]))
    assert err.line == 7  # the use, in the cell
    assert "fn 'f' cannot declare an input" in err.message
    assert [s.line for _, s in err.notes] == [2]  # the statement in the fn


def test_block_fn_cannot_declare_an_output():
    err = _compile_error(_use_f(["output z = x", "x"]))
    assert err.line == 7
    assert "fn 'f' cannot declare an output" in err.message
    assert [s.line for _, s in err.notes] == [2]


def test_block_fn_cannot_declare_an_input_inside_a_for_loop():
    err = _compile_error(_use_f(["for i in 0..2 {", "    input z", "}", "x"]))
    assert err.line == 9
    assert "cannot declare an input" in err.message
    assert [s.line for _, s in err.notes] == [3]


def test_block_fn_must_end_with_an_expression():
    err = _compile_error(_use_f(["a = x"]))
    assert err.line == 2  # its last statement
    assert "fn 'f' must end with its value" in err.message


def test_an_expression_alone_before_the_last_line_is_an_error():
    err = _compile_error(_use_f(["x * 2", "x"]))
    assert err.line == 7
    assert "an expression alone is not a statement in a block fn" in err.message
    assert [s.line for _, s in err.notes] == [2]


def test_an_expression_alone_in_a_cell_is_an_error():
    err = _compile_error("cell C() {\n    input x\n    x * 2\n    output y = x\n}\n")
    assert err.line == 3
    assert "an expression alone is not a statement in cell 'C'" in err.message


@pytest.mark.parametrize("kind", ["state", "param"])
def test_block_fn_cannot_declare_a_name_of_its_parameter(kind):
    err = _compile_error(_use_f([f"{kind} x", "x"]))
    assert err.line == 7
    assert "'x' is a parameter of fn 'f'" in err.message
    assert [s.line for _, s in err.notes] == [2]


def test_block_fn_declaring_the_same_name_twice():
    err = _compile_error(_use_f(["param s", "state s", "s"]))
    assert err.line == 8
    assert "'f_s' is declared twice" in err.message
    assert [s.line for _, s in err.notes] == [3]


def test_block_fn_does_not_see_the_callers_locals():
    err = _compile_error(_use_f(["a = x", "a + b"], cell_extra="    b = x\n"))
    assert err.line == 8
    assert "unknown name 'b'" in err.message and "sees only its parameters" in err.message
    assert [s.line for _, s in err.notes] == [3]


GRID = """\
fn f(v) {{
    {decl}
    v * 2
}}
cell G() over grid2d {{
    input x
    state h
    h' = sum_pred(f(h)) + x
    output y = h'
}}
"""


def test_block_fn_with_states_inside_a_predecessor_form_is_an_error():
    err = _compile_error(GRID.format(decl="state s"))
    assert err.line == 8
    assert "fn 'f' declares states or params, so it cannot be used inside a predecessor " \
           "form" in err.message


def test_block_fn_without_states_inside_a_predecessor_form_is_fine():
    m = rcc.compile(GRID.format(decl="a = v"))().double()
    y, _ = m(torch.ones(1, 2, 2, dtype=torch.float64))
    # h(i, j) = 2 * (h(i-1, j) + h(i, j-1)) + 1
    assert torch.equal(y, torch.tensor([[[1.0, 3.0], [3.0, 13.0]]], dtype=torch.float64))


# ---- bugs found while writing these tests, fixed ------------------------------------------------

def test_state_initial_value_pi_alone():
    m = rcc.compile("cell C() {\n    input x\n    state c = pi\n    output y = x + c\n}\n")()
    _, final = m.double()(torch.zeros(1, 1, dtype=torch.float64))
    assert torch.equal(final["c"], torch.full((1,), math.pi, dtype=torch.float64))


def test_state_initial_value_a_block_fn_parameter():
    src = ("fn reg(v) {\n    state s = v\n    s' = s + 1\n    s'\n}\n"
           "cell C() {\n    input x\n    output y = x + reg(5)\n}\n")
    y, _ = rcc.compile(src)().double()(torch.zeros(1, 3, dtype=torch.float64))
    assert torch.equal(y, torch.tensor([[6.0, 7.0, 8.0]], dtype=torch.float64))


def test_state_initial_value_a_param_passed_to_a_block_fn():
    src = ("fn reg(p) {\n    state s = p\n    s' = s\n    s'\n}\n"
           "cell C() {\n    input x\n    param p = 1, q = 2\n    output y = x + reg(q)\n}\n")
    y, _ = rcc.compile(src)().double()(torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(y, torch.full((1, 2), 2.0, dtype=torch.float64))


def test_block_fn_cannot_update_the_callers_state():
    src = ("fn f(v) {\n    h' = v * 10\n    v\n}\n"
           "cell C() {\n    input x\n    state h\n    output y = f(x)\n}\n")
    err = _compile_error(src)
    assert err.line == 8 and "updates only the states it declares" in err.message
    assert err.notes[0][1].line == 2  # the update, in the fn


def test_fns_cannot_read_the_callers_primed_state():
    src = ("fn f(v) = v + h'\n"
           "cell C() {\n    input x\n    state h\n    h' = h + x\n    output y = f(x)\n}\n")
    err = _compile_error(src)
    assert err.line == 6 and "cannot read h'" in err.message


def test_a_block_fn_state_cannot_start_from_the_callers_param():
    src = ("fn reg(v) {\n    state s = p\n    s' = s + v\n    s'\n}\n"
           "cell C() {\n    input x\n    param p = 1\n    output y = reg(x)\n}\n")
    err = _compile_error(src)
    assert "unknown initializer 'p'" in err.message


# ---- fn parameters with defaults, arguments by name ---------------------------------------------

def test_fn_defaults_and_keyword_arguments():
    src = ("fn mix(a, b = 2, c = b + 1) = a * b + c\n"
           "cell C() {\n    input x\n"
           "    output y = mix(x) + mix(x, 3) + mix(x, c = 0) + mix(b = 1, a = x)\n}\n")
    y, _ = rcc.compile(src)().double()(torch.ones(1, 2, dtype=torch.float64))
    assert torch.equal(y, torch.full((1, 2), 5.0 + 7.0 + 2.0 + 3.0, dtype=torch.float64))


@pytest.mark.parametrize("call,message", [
    ("mix(x, d = 1)", "fn 'mix' has no parameter 'd' (its parameters: a, b, c)"),
    ("mix(x, a = 1)", "fn 'mix' gets parameter 'a' twice"),
    ("mix(b = 1)", "fn 'mix' needs parameter 'a'"),
    ("mix(x, 1, 2, 3)", "fn 'mix' takes 1 to 3 arguments, got 4"),
])
def test_fn_argument_errors(call, message):
    src = f"fn mix(a, b = 2, c = b + 1) = a * b + c\ncell C() {{\n    input x\n    output y = {call}\n}}\n"
    err = _compile_error(src)
    assert err.line == 4 and message in err.message


def test_a_parameter_without_default_after_one_with_is_an_error():
    err = _compile_error("fn f(a = 1, b) = a\ncell C() {\n    input x\n    output y = f(x, x)\n}\n")
    assert (err.line, err.col) == (1, 13) and "defaults come last" in err.message


def test_lsrl_sugar_takes_lsrl_keyword_arguments():
    src = ("use lsrl\ncell C() {\n    input x\n"
           "    output a = f_larger(x, 0.5, scale = 100)\n"
           "    output b = f_ifelse(f_larger(x, 0.5), 1, 2, large_constant = 100)\n}\n")
    (a, b), _ = rcc.compile(src)().double()(torch.tensor([[0.0, 0.505, 1.0]], dtype=torch.float64))
    assert torch.allclose(a, torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64))
    assert torch.equal(b, torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64))  # scale 1000
