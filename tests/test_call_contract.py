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
