"""IR passes: each keeps the IR verified and the numbers unchanged."""
import torch

import rcc
from rcc import ir
from rcc.api import build_ir

DEAD = """
cell Dead(d) {
    input x[d]
    state h[d]
    for j in 0..3 { q = h[j] * 2 }
    unused = sigmoid(x)
    h' = h + x
    output y = h'
}"""


def test_dead_code_is_removed_and_ir_verifies():
    cell, _, _ = build_ir(DEAD)
    ir.verify(cell)
    assert {n.op for n in cell.nodes} == {"input", "state", "add"}
    m = rcc.compile(DEAD)(d=4)
    x = torch.randn(2, 5, 4)
    y, fin = m(x)
    torch.testing.assert_close(y, x.cumsum(1))
    torch.testing.assert_close(fin["h"], x.sum(1))


def test_dead_code_keeps_checks_of_removed_values():
    # h[3] is out of range for d=2 even though the value is never used
    import pytest
    with pytest.raises(rcc.CompileError):
        rcc.compile(DEAD)(d=2)


def test_input_projections_are_hoisted_out_of_the_time_loop():
    import inspect

    from conftest import stdlib

    src = inspect.getsource(rcc.compile(stdlib("lstm.rnn")))
    before, loop = src.split("for _t in range(_T):")
    assert "F.linear(x, weight_ih)" in before  # one GEMM over all steps
    assert "weight_ih" not in loop and "F.linear(h, weight_hh)" in loop
