"""The compiled kernels (backends cpp and triton) index the tensors they get by the sizes they
were built for: every call checks each tensor first, and autograd's in-place check covers what
their backward reads (issue 21, R1 and R3)."""
import pytest
import torch

import rcc
from conftest import stdlib

BACKENDS = ["cpp", "triton"]


def _module(backend, file="lstm.rnn", **dims):
    m = rcc.compile(stdlib(file), backend=backend)(**(dims or {"d_in": 3, "d": 4}))
    return m.double() if backend == "triton" else m


def _input(m, *shape):
    return torch.randn(*shape, dtype=next(m.parameters()).dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("replace", ["data", "parameter", "larger"])
def test_a_param_of_another_shape_is_refused(backend, grad, replace):
    m = _module(backend)
    if replace == "data":
        m.weight_hh.data = torch.randn(1, dtype=m.weight_hh.dtype)
    elif replace == "parameter":
        m.weight_hh = torch.nn.Parameter(torch.randn(16, 5, dtype=m.weight_hh.dtype))
    else:  # as many elements, another shape: would be read silently wrong
        m.weight_hh.data = torch.randn(4, 16, dtype=m.weight_hh.dtype)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="'weight_hh' has shape"):
        m(_input(m, 2, 5, 3))


@pytest.mark.parametrize("T", [1, 6])  # T=1 without grad: cpp's whole-step entry point
def test_cpp_whole_step_entry_checks_too(T):
    m = _module("cpp")
    m.bias_hh.data = torch.randn(3)
    with torch.no_grad(), pytest.raises(ValueError, match="'bias_hh' has shape"):
        m(torch.randn(1, T, 3))


def test_cpp_graph_kernel_checks_too():
    m = rcc.compile(stdlib("mdrnn.rnn"), backend="cpp")(d_in=2, d=3)
    m.U_0.data = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'U_0' has shape"):
        m(torch.randn(2, 3, 4, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_modified_in_place_before_backward_raises(backend):
    m = _module(backend)
    y, _ = m(_input(m, 2, 5, 3))
    with torch.no_grad():
        m.weight_hh.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("literal", ["18446744073709551616", "1e30", "4294967296"])
def test_large_literals_are_exact_on_cpp(literal):
    src = ("cell Big(d) {\n    input x[d]\n    state h[d]\n"
           f"    h' = 0.5 * h + x * {literal} * 1e-19\n    output h'\n}}\n")
    ref, cpp = rcc.compile(src)(d=2).double(), rcc.compile(src, backend="cpp")(d=2).double()
    x = torch.randn(1, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(cpp(x)[0], ref(x)[0], rtol=1e-12, atol=0)
