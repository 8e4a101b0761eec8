"""Generation one step at a time (issue 19): `m.step(x_t, cache)` from step to step equals the
full sequence's run, on every backend and on a Stack; a cache reorders for beam search."""
import pytest
import torch

import rcc
from conftest import stdlib


@pytest.mark.parametrize("cell, dims, backend, plan, heads", [
    ("lstm.rnn", dict(d_in=3, d=4), "torch", "sequential", ()),
    ("lstm.rnn", dict(d_in=3, d=4), "torch", "auto", ()),
    ("lstm.rnn", dict(d_in=3, d=4), "cpp", "sequential", ()),
    ("lstm.rnn", dict(d_in=3, d=4), "triton", "sequential", ()),
    ("gla.rnn", dict(K=3, V=2), "torch", "chunk", (2,)),
    ("gla.rnn", dict(K=3, V=2), "cpp", "sequential", (2,)),
])
def test_steps_equal_the_full_sequence(cell, dims, backend, plan, heads):
    torch.manual_seed(0)
    m = rcc.compile(stdlib(cell), backend=backend, plan=plan)(**dims).double()
    T = 6
    xs = [torch.randn(2, T, *heads, *m.shapes[n], dtype=torch.float64) for n in m.INPUTS]
    if "gk" in m.INPUTS:
        xs[3] = -xs[3].abs()
    y, final = m(*xs)
    cache = None
    with torch.no_grad():  # decoding: backend cpp's whole-step path
        for t in range(T):
            y_t, cache = m.step(*[x[:, t] for x in xs], cache=cache)
            torch.testing.assert_close(y_t, y[:, t])
    assert cache.steps == T
    for name in m.STATES:
        torch.testing.assert_close(cache.states[name], final[name])


def test_a_stack_steps_and_a_cache_reorders():
    torch.manual_seed(0)
    lstm = rcc.compile(stdlib("lstm.rnn"))
    for batch_first in (True, False):
        stack = rcc.Stack(lstm, num_layers=2, batch_first=batch_first, d_in=3, d=4).double()
        x = torch.randn(3, 5, 3, dtype=torch.float64)  # [B, T, d_in]
        y, final = stack(x if batch_first else x.transpose(0, 1))
        y = y if batch_first else y.transpose(0, 1)
        cache = None
        for t in range(5):
            y_t, cache = stack.step(x[:, t], cache)
            torch.testing.assert_close(y_t, y[:, t])
        torch.testing.assert_close(cache.states["c"], final["c"])
    beams = cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(beams.states["h"][:, 1], cache.states["h"][:, 2])  # batch axis 1
    m = lstm(d_in=3, d=4)
    _, c = m.step(torch.randn(3, 3))
    torch.testing.assert_close(c.reorder(torch.tensor([1, 1])).states["h"][1], c.states["h"][1])
    with pytest.raises(TypeError, match="bidirectional Stack cannot run one step"):
        rcc.Stack(lstm, bidirectional=True, d_in=3, d=4).step(torch.randn(3, 3))
    with pytest.raises(TypeError, match="cache must be the Cache"):
        m.step(torch.randn(3, 3), cache={"h": torch.zeros(3, 4)})
