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


def test_inputs_that_disagree_on_batch_time_or_heads_are_named_in_that_order():
    m = rcc.compile(stdlib("gla.rnn"))(K=3, V=2)
    q, k, v = torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 2)
    with pytest.raises(ValueError) as e:
        m(q, k, v, -torch.rand(2, 5, 3))
    assert "batch, time and head sizes [2, 5] differ from the first input's [2, 5, 4]" \
        in str(e.value)


def test_a_stdlib_path_names_the_packaged_stdlib_from_any_directory(tmp_path, monkeypatch):
    """LANGUAGE.md's rcc.compile("stdlib/mingru.rnn") away from a checkout; a file of that name
    in the working directory is still what is read."""
    monkeypatch.chdir(tmp_path)
    m = rcc.compile("stdlib/mingru.rnn")(d_in=3, d=4)
    assert m(torch.randn(2, 5, 3))[0].shape == (2, 5, 4)
    with pytest.raises(rcc.CompileError, match="cannot read stdlib/nope.rnn"):
        rcc.compile("stdlib/nope.rnn")
    (tmp_path / "stdlib").mkdir()
    (tmp_path / "stdlib" / "mingru.rnn").write_text(
        "cell Mine(d) {\n    input x[d]\n    state h[d]\n    h' = h + x\n    output y = h'\n}\n")
    assert rcc.compile("stdlib/mingru.rnn").CELL == "Mine"


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


def test_num_heads_catches_a_head_first_input():
    """[B, H, T, K] fits [B, T, *heads, K] by accident; with num_heads= it is refused."""
    gla = rcc.compile(stdlib("gla.rnn"))
    m = gla(K=3, V=2, num_heads=4)
    assert m.num_heads == 4 and m.dims == {"K": 3, "V": 2} and "num_heads=4" in repr(m)
    q, k, gk = torch.randn(2, 7, 4, 3), torch.randn(2, 7, 4, 3), -torch.rand(2, 7, 4, 3)
    v = torch.randn(2, 7, 4, 2)
    y, _ = m(q, k, v, gk)
    assert y.shape == (2, 7, 4, 2)
    first = [t.transpose(1, 2) for t in (q, k, v, gk)]  # head-first
    with pytest.raises(ValueError, match=r"input 'q' has shape \[2, 4, 7, 3\] but GLA "
                                         r"\(num_heads=4\) expects \[B, T, 4, 3\] \(head-first"):
        m(*first)
    with pytest.raises(ValueError, match="expects"):  # no head axis at all
        m(q[:, :, 0], k[:, :, 0], v[:, :, 0], gk[:, :, 0])
    unchecked = gla(K=3, V=2)
    assert unchecked(*first)[0].shape == (2, 4, 7, 2)  # read as T=4, heads=(7,)
    with pytest.raises(TypeError, match="num_heads must be a positive integer"):
        gla(K=3, V=2, num_heads=0)


def test_num_heads_survives_copies_and_respecialization():
    import copy
    import pickle

    m = rcc.compile(stdlib("gla.rnn"))(K=3, V=2, num_heads=4)
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.num_heads == 4
    cell = ("cell R(n) {\n input x[n]\n state h[n]\n a = h\n for j in 0..n { a = a + x }\n"
            " h' = a\n output y = h'\n}")
    r = rcc.compile(cell)(n=3, num_heads=2)  # n sets a loop count: a class per value of n
    assert r.num_heads == 2 and r(torch.randn(1, 5, 2, 3))[0].shape == (1, 5, 2, 3)


@pytest.mark.parametrize("backend, plan, cell, dims, wrt", [
    ("cpp", "sequential", "lstm.rnn", dict(d_in=3, d=4), 0),
    ("torch", "scan", "gla.rnn", dict(K=3, V=2), 1),  # k: through the scan (q is not)
    ("torch", "newton", "pararnn_gru.rnn", dict(d_in=3, d=4), 0),
])
def test_double_backward_through_a_kernel_is_an_error_not_zero(backend, plan, cell, dims, wrt):
    """A backward that is not itself differentiated refuses create_graph's second pass (it gave
    a silent None/zero second derivative); plan sequential on backend torch has a true one."""
    m = rcc.compile(stdlib(cell), backend=backend, plan=plan)(**dims).double()
    xs = [torch.randn(2, 5, *m.shapes[n], dtype=torch.float64, requires_grad=True)
          for n in m.INPUTS]
    if "gk" in m.INPUTS:
        xs[3] = (-torch.rand(2, 5, 3, dtype=torch.float64)).requires_grad_()
    y, _ = m(*xs)
    (g,) = torch.autograd.grad(y.pow(2).sum(), xs[wrt], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()  # a gradient penalty


def test_double_backward_of_plan_sequential_is_right():
    m = rcc.compile(stdlib("lstm.rnn"), plan="sequential")(d_in=3, d=4).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x: m(x)[0], (x,))
