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
