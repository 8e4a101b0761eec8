"""End-to-end basics: compile, call conventions, heads, initial state, dtype, errors at call time."""
import pytest
import torch

import rcc
from conftest import stdlib


def mingru_loop(m, x, h):
    ys = []
    for t in range(x.shape[1]):
        z = torch.sigmoid(x[:, t] @ m.Wz.T + m.bz)
        h = (1 - z) * h + z * (x[:, t] @ m.Wh.T + m.bh)
        ys.append(h)
    return torch.stack(ys, 1), h


def test_mingru_matches_hand_loop_fwd_bwd():
    m = rcc.compile(stdlib("mingru.rnn"))(d_in=3, d=5).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    y, fin = m(x, initial_state={"h": h0})
    y_ref, h_ref = mingru_loop(m, x, h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(fin["h"], h_ref)
    g = torch.autograd.grad(y.sum() + fin["h"].pow(2).sum(), (x, h0, m.Wz))
    g_ref = torch.autograd.grad(y_ref.sum() + h_ref.pow(2).sum(), (x, h0, m.Wz))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_heads_and_names():
    Cell = rcc.compile(stdlib("mingru.rnn"))
    m = Cell(d_in=4, d=2)
    x = torch.randn(3, 5, 2, 6, 4)  # [B, T, H1, H2, d_in]
    y, fin = m(x=x)
    assert y.shape == (3, 5, 2, 6, 2)
    assert fin["h"].shape == (3, 2, 6, 2)
    # each head is independent: equal to running it alone
    y1, _ = m(x[:, :, 1, 4])
    torch.testing.assert_close(y[:, :, 1, 4], y1)


def test_module_is_nn_module_and_cached():
    a = rcc.compile(stdlib("mingru.rnn"))
    b = rcc.compile(stdlib("mingru.rnn"))
    assert a is b
    assert issubclass(a, torch.nn.Module)
    m = a(d_in=1, d=1)
    assert {n for n, _ in m.named_parameters()} == {"Wz", "bz", "Wh", "bh"}


def test_runtime_shape_mismatch_names_the_input():
    m = rcc.compile(stdlib("mingru.rnn"))(d_in=3, d=5)
    with pytest.raises(ValueError, match=r"input 'x' has shape \[2, 7, 4\].*\[B, T, \*heads, 3\]"):
        m(torch.randn(2, 7, 4))


def test_float32_and_float64():
    m = rcc.compile(stdlib("mingru.rnn"))(d_in=3, d=5)
    y, _ = m(torch.randn(2, 1, 3))
    assert y.dtype == torch.float32 and y.shape == (2, 1, 5)
    y, _ = m.double()(torch.randn(2, 1, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_zeros_and_ones_of_different_shapes_are_different_values():
    """The builder shares equal expressions; zeros()/ones() have no args, so their shapes must
    tell them apart (ones(1) once took the node of an earlier ones(e, d))."""
    import torch
    src = """
cell C(d, e) {
    input x[d]
    param p[d]
    state s[d]
    s' = s
    output y = ones(e, d) * x
    output z = concat(p, ones(1))
}"""
    m = rcc.compile(src, backend="torch")(d=3, e=2)
    y, z = m(torch.randn(1, 2, 3))[0]
    assert y.shape == (1, 2, 2, 3) and z.shape == (1, 2, 4)
    assert torch.equal(z[0, 0, 3], torch.tensor(1.0))


LOOP_DIM = """
cell C(d, n) {
    input x[n, d]
    state h[d]
    acc = h
    for j in 0..n {
        acc = acc + x[j] * (j + 1)
    }
    h' = acc
    output y = h'
}
"""


def test_dims_given_to_compile_are_the_defaults_at_construction():
    """dims= binds a dim that sets a loop count (and any other): the class takes it as the
    default; another value at construction re-specializes, as a dim with no value does."""
    x = torch.randn(2, 4, 3, 2)
    m = rcc.compile(LOOP_DIM, dims={"n": 3})(d=2)
    assert m.dims == {"d": 2, "n": 3}
    want = (x * torch.tensor([1.0, 2.0, 3.0])[:, None]).sum(2).cumsum(1)
    torch.testing.assert_close(m(x)[0], want)
    assert rcc.compile(LOOP_DIM, dims={"d": 2})(n=3).dims == {"d": 2, "n": 3}
    m4 = rcc.compile(LOOP_DIM, dims={"n": 3})(d=2, n=4)
    assert m4(torch.randn(2, 4, 4, 2))[0].shape == (2, 4, 2)


def test_python_spellings_a_user_brings():
    """`2.` is a float literal (not when a range `0..n` follows a number) and softmax takes
    its axis by place, as torch.softmax(x, 0) does."""
    src = """
cell C(d) {
    input a[d, d]
    state h[d]
    acc = h
    for j in 0..2 {
        acc = acc + 2. * softmax(a, 0)[j]
    }
    h' = acc
    output y = h'
}
"""
    a = torch.randn(1, 3, 4, 4)
    got, _ = rcc.compile(src)(d=4)(a)
    rows = 2.0 * torch.softmax(a, 2)[:, :, :2].sum(2)
    torch.testing.assert_close(got, rows.cumsum(1))


def test_dims_given_to_compile_are_checked_and_default_free_dims():
    M = rcc.compile(stdlib("mingru.rnn"), dims={"d": 8})
    assert M(d_in=3).dims == {"d_in": 3, "d": 8} and M(d_in=3, d=5).dims == {"d_in": 3, "d": 5}
    for bad, why in (({"zz": 8}, "has no dim 'zz'"), ({"d": 0}, "positive integer"),
                     ({"d": "x"}, "positive integer")):
        with pytest.raises(rcc.CompileError, match=why):
            rcc.compile(stdlib("mingru.rnn"), dims=bad)


def test_from_torch_refuses_a_relu_rnn_for_the_tanh_elman_cell():
    rnn = torch.nn.RNN(3, 4, batch_first=True, nonlinearity="relu")
    with pytest.raises(ValueError, match="nonlinearity='relu'"):
        rcc.from_torch(rcc.compile(stdlib("elman.rnn"))(d_in=3, d=4), rnn)


def test_rcc_lsrl_is_there_after_import_rcc():
    import subprocess
    import sys
    code = "import rcc; print(callable(rcc.lsrl.compile))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr


def test_the_device_plan_auto_chooses_for_is_checked():
    import rcc.api
    assert "plan chunk" in rcc.generate(stdlib("gla.rnn"), device=torch.device("cuda", 1))
    for call in (rcc.generate, rcc.api.explain):
        with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
            call(stdlib("gla.rnn"), device="tpu")
