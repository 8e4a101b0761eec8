"""@rcc.recurrence: Python functions traced into the same IR as .rnn cells."""
import pytest
import torch

import rcc
from conftest import stdlib


@rcc.recurrence
def MinGRU(x: rcc.Input["d_in"], h: rcc.State["d"], Wz: rcc.Param["d", "d_in"], bz: rcc.Param["d"],
           Wh: rcc.Param["d", "d_in"], bh: rcc.Param["d"]):
    z = rcc.sigmoid(Wz @ x + bz)
    h_next = (1 - z) * h + z * (Wh @ x + bh)
    return {"h'": h_next, "y": h_next}


def test_traced_equals_rnn_cell():
    traced = MinGRU(d_in=3, d=4).double()
    dsl = rcc.compile(stdlib("mingru.rnn"))(d_in=3, d=4).double()
    dsl.load_state_dict(traced.state_dict())
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    y1, f1 = traced(x)
    y2, f2 = dsl(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(f1["h"], f2["h"])
    g1 = torch.autograd.grad(y1.sum(), (x, traced.Wz))
    g2 = torch.autograd.grad(y2.sum(), (x, dsl.Wz))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_traced_module_keeps_user_names_and_imports_no_compiler():
    import inspect

    src = inspect.getsource(MinGRU)
    assert "h_next = " in src
    assert "lark" not in src and "sympy" not in src


def test_python_loops_unroll_and_split():
    @rcc.recurrence(dims={"n": 3})
    def Counter(x: rcc.Input["n"], s: rcc.State["n"], A: rcc.Param("n", "n", init="eye")):
        acc = s
        for _ in range(2):  # a Python loop is unrolled at trace time
            acc = A @ acc + x
        a, b, c = rcc.split(acc, 3)
        return {"s'": acc, "y": rcc.concat(c, b, a), "total": rcc.sum(acc)}

    m = Counter().double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    (y, total), fin = m(x)
    s = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(4):
        s = s + 2 * x[:, t]
        torch.testing.assert_close(y[:, t], s.flip(-1))
        torch.testing.assert_close(total[:, t], s.sum(-1))
    torch.testing.assert_close(fin["s"], s)


def test_traced_errors_point_at_the_python_line():
    with pytest.raises(rcc.CompileError) as info:
        @rcc.recurrence
        def Bad(x: rcc.Input["d_in"], h: rcc.State["d"], W: rcc.Param["d", "d"]):
            return {"h'": W @ x}  # the line of the error
    err = info.value
    assert err.filename == __file__
    assert "shape mismatch in @" in err.message and "[d, d]" in err.message
    assert "the line of the error" in str(err)
    assert "^" in str(err)


def test_traced_bad_annotation_and_return():
    with pytest.raises(rcc.CompileError, match="needs an annotation"):
        @rcc.recurrence
        def NoAnn(x, h: rcc.State["d"]):
            return {"h'": h}
    with pytest.raises(rcc.CompileError, match="must return a dict"):
        @rcc.recurrence
        def NoDict(x: rcc.Input["d"], h: rcc.State["d"]):
            return h + x
    with pytest.raises(rcc.CompileError, match="no truth value"):
        @rcc.recurrence
        def Branch(x: rcc.Input["d"], h: rcc.State["d"]):
            if x > 0:
                h = h + 1
            return {"h'": h, "y": h}
