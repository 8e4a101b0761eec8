"""Backend 'cpp' equals the torch reference on every stdlib cell: outputs, final states and
gradients (inputs, params, initial states), float64 and float32, T=1 and odd T, heads."""
import pytest
import torch

import rcc
from conftest import STDLIB_DIMS, cell_inputs, run_with_grads, stdlib


def _pair(name, dims, dtype):
    ref = rcc.compile(stdlib(name), backend="torch", plan="sequential")(**dims).to(dtype)
    mod = rcc.compile(stdlib(name), backend="cpp")(**dims).to(dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _compare(ref, mod, B, T, heads, dtype, tol):
    xs, init = cell_inputs(ref, B, T, heads, dtype)
    want, want_grads = run_with_grads(ref, xs, init)
    got, got_grads = run_with_grads(mod, xs, init)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)
    for w, g in zip(want_grads, got_grads):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w, **tol)


F64 = {"rtol": 1e-9, "atol": 1e-10}
F32 = {"rtol": 2e-4, "atol": 2e-5}


@pytest.mark.parametrize("name", sorted(STDLIB_DIMS))
@pytest.mark.parametrize("T", [1, 7])
def test_cpp_equals_torch_float64(name, T):
    ref, mod = _pair(name, STDLIB_DIMS[name], torch.float64)
    _compare(ref, mod, 3, T, (2,), torch.float64, F64)


@pytest.mark.parametrize("name", sorted(STDLIB_DIMS))
def test_cpp_equals_torch_float32(name):
    ref, mod = _pair(name, STDLIB_DIMS[name], torch.float32)
    _compare(ref, mod, 2, 5, (), torch.float32, F32)
