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


def test_torch_spellings_say_the_rcc_one_at_the_line():
    with pytest.raises(rcc.CompileError, match="torch.tanh cannot trace .* write rcc.tanh") as e:
        @rcc.recurrence
        def TorchTanh(x: rcc.Input["d"], h: rcc.State["d"]):
            return {"h'": torch.tanh(h + x)}
    assert e.value.span.filename == __file__
    with pytest.raises(rcc.CompileError, match=r"no method .sum\(\); write rcc.sum"):
        @rcc.recurrence
        def MethodSum(x: rcc.Input["d"], h: rcc.State["d"]):
            return {"h'": h + x.sum()}

    @rcc.recurrence
    def Abs(x: rcc.Input["d"], h: rcc.State["d"]):  # Python's abs() is rcc.abs
        h_next = 0.5 * h + abs(x)
        return {"h'": h_next, "y": h_next}
    x = torch.randn(1, 3, 2)
    y, _ = Abs(d=2)(x)
    torch.testing.assert_close(y[:, 0], x[:, 0].abs())

    @rcc.recurrence
    def TorchScalar(x: rcc.Input["d"], h: rcc.State["d"]):  # a 0-d tensor on the left: its value
        h_next = torch.tensor(0.5) * h + x - torch.tensor(1.0)
        return {"h'": h_next, "y": h_next}
    y, _ = TorchScalar(d=2)(x)
    torch.testing.assert_close(y[:, 1], 0.5 * (x[:, 0] - 1) + x[:, 1] - 1)


# ---- dims as values (issue 18): `K: rcc.Dim` arguments --------------------------------------
@rcc.recurrence
def ScaledGLA(q: rcc.Input["K"], k: rcc.Input["K"], v: rcc.Input["V"], gk: rcc.Input["K"],
              S: rcc.State["K", "V"], K: rcc.Dim):
    S_next = rcc.exp(gk)[:, None] * S + rcc.outer(k, v)
    return {"S'": S_next, "o": (q * K ** -0.5) @ S_next}


def test_a_dim_argument_is_the_dims_value():
    """stdlib/gla.rnn writes `q * K ** -0.5`: the traced cell reads K the same way."""
    traced, dsl = ScaledGLA(K=4, V=3).double(), rcc.compile(stdlib("gla.rnn"))(K=4, V=3).double()
    xs = [torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64),
          torch.randn(2, 5, 3, dtype=torch.float64), -torch.rand(2, 5, 4, dtype=torch.float64)]
    torch.testing.assert_close(traced(*xs)[0], dsl(*xs)[0])
    torch.testing.assert_close(ScaledGLA(K=6, V=2).dims, {"K": 6, "V": 2})


def test_a_dim_argument_in_slices_and_integer_arithmetic():
    @rcc.recurrence
    def Halves(x: rcc.Input["d"], h: rcc.State["d // 2"], d: rcc.Dim):
        first, second = x[:d // 2], x[d // 2:2 * (d // 2)]
        return {"h'": h * rcc.sigmoid(first) + second / d, "y": h}

    for d in (6, 7):  # odd d: the slices still have d // 2 entries
        m = Halves(d=d).double()
        x = torch.randn(2, 5, d, dtype=torch.float64)
        _, final = m(x)
        h = torch.zeros(2, d // 2, dtype=torch.float64)
        for t in range(5):
            h = h * torch.sigmoid(x[:, t, :d // 2]) + x[:, t, d // 2:2 * (d // 2)] / d
        torch.testing.assert_close(final["h"], h)


def test_a_dim_has_no_truth_value_at_trace_time():
    with pytest.raises(rcc.CompileError, match="a dim has no truth value") as e:
        @rcc.recurrence
        def Branchy(x: rcc.Input["d"], h: rcc.State["d"], d: rcc.Dim):
            if d > 4:
                return {"h'": h + x}
            return {"h'": h - x}
    assert e.value.span.filename == __file__


# ---- split of a free dim (issue 18): the parts are [d // 2] once d is bound -----------------
SPLIT_FREE = """
cell SplitFree(d) {
    input x[d]
    state h[d // 2], z[d]
    a, b = split(x, 2)
    h' = h * sigmoid(a) + b
    z' = z + concat(b, a)
    output y = h'
}
"""


@pytest.mark.parametrize("backend, plan", [("torch", "sequential"), ("torch", "scan"),
                                           ("cpp", "sequential")])
def test_split_of_a_free_dim_matches_its_declared_half(backend, plan):
    m = rcc.compile(SPLIT_FREE, backend=backend, plan=plan)(d=6).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    y, final = m(x)
    h, z = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64)
    for t in range(5):
        a, b = x[:, t, :3], x[:, t, 3:]
        h, z = h * torch.sigmoid(a) + b, z + torch.cat([b, a], -1)
    torch.testing.assert_close(final["h"], h)
    torch.testing.assert_close(final["z"], z)
    torch.testing.assert_close(y[:, -1], h)


def test_split_of_a_free_dim_into_unequal_parts_is_refused_when_bound():
    cls = rcc.compile(SPLIT_FREE)
    with pytest.raises(rcc.CompileError, match=r"split\(\) part size is 2.5, not an integer, "
                                               r"for d=5"):
        cls(d=5)
