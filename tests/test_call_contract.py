"""Bad calls get clear errors before any plan (or plan auto's cost model) runs; initial_state
takes a dict or, for a one-state cell, a tensor (issue 18 item 4, issue 21)."""
import pytest
import torch

import rcc
from conftest import stdlib


@pytest.fixture(scope="module")
def lstm():
    return rcc.compile(stdlib("lstm.rnn"))(d_in=3, d=4)  # plan auto


@pytest.mark.parametrize("call,error,message", [
    (lambda m: m(), TypeError, "missing input 'x'"),
    (lambda m: m(torch.randn(2, 0, 3)), ValueError, "empty time axis"),
    (lambda m: m(torch.randn(5, 3)), ValueError, "expects [B, T, *heads, 3]"),
    (lambda m: m(torch.randn(2, 5, 3, dtype=torch.float64)), TypeError, "call m.double()"),
    (lambda m: m(torch.randn(2, 5, 3), initial_state=torch.randn(2, 4)), TypeError,
     "has 2 states: pass a dict"),
    (lambda m: m(torch.randn(2, 5, 3), initial_state=[torch.randn(2, 4)]), TypeError,
     "must be a dict"),
    (lambda m: m(torch.randn(2, 5, 3), initial_state={"z": torch.randn(2, 4)}), ValueError,
     "unknown state 'z'"),
])
def test_bad_calls_name_what_is_wrong(lstm, call, error, message):
    with pytest.raises(error) as e:
        call(lstm)
    assert message in str(e.value)


def test_initial_state_as_one_tensor():
    m = rcc.compile(stdlib("gla.rnn"))(K=3, V=2)
    xs = (torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 2), -torch.rand(2, 5, 3))
    S0 = torch.randn(2, 3, 2)
    torch.testing.assert_close(m(*xs, initial_state=S0)[0], m(*xs, initial_state={"S": S0})[0])


def test_autocast_is_not_refused():
    m = rcc.compile(stdlib("lstm.rnn"))(d_in=3, d=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(torch.randn(2, 5, 3, dtype=torch.bfloat16))
    assert y.shape == (2, 5, 4)


@pytest.mark.parametrize("cell, dims, backend, plan", [
    ("lstm.rnn", dict(d_in=3, d=4), "torch", "sequential"),
    ("lstm.rnn", dict(d_in=3, d=4), "torch", "auto"),
    ("lstm.rnn", dict(d_in=3, d=4), "cpp", "sequential"),
    ("gla.rnn", dict(K=3, V=2), "torch", "chunk"),
    ("gla.rnn", dict(K=3, V=2), "torch", "scan"),
    ("pararnn_gru.rnn", dict(d_in=3, d=4), "torch", "newton"),
    ("mdrnn.rnn", dict(d_in=3, d=4), "torch", "sequential"),
    ("mdrnn.rnn", dict(d_in=3, d=4), "cpp", "sequential"),
])
def test_output_final_state_false_returns_none(cell, dims, backend, plan):
    """flash-linear-attention's `output_final_state`: False returns (outputs, None)."""
    m = rcc.compile(stdlib(cell), backend=backend, plan=plan)(**dims)
    grid = "grid2d" in open(stdlib(cell)).read()
    xs = [torch.randn(2, *((3, 4) if grid else (5,)), *((2,) if "K" in dims else ()),
                      *m.shapes[n]) for n in m.INPUTS]
    y, final = m(*xs)
    y_only, none = m(*xs, output_final_state=False)
    assert none is None and final
    torch.testing.assert_close(y_only, y)
