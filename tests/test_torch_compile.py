"""rcc modules under torch.compile and torch.export: one op per cell (rcc.runtime.ops), no graph
break, no recompile when T or B changes, the compiled model equal to eager, forward and backward.

Dynamo's compile counter runs the aot_eager backend (AOTAutograd's forward and backward graphs,
without Inductor's C++ build per graph); one test runs Inductor itself."""
import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import rcc
from conftest import ROOT

STDLIB = f"{ROOT}/stdlib"
# (cell file, dims, backend, plan, heads): every plan, and backend cpp
CASES = [
    ("lstm.rnn", dict(d_in=4, d=5), "torch", "sequential", ()),
    ("lstm.rnn", dict(d_in=4, d=5), "torch", "auto", ()),
    ("lstm.rnn", dict(d_in=4, d=5), "cpp", "sequential", ()),
    ("gla.rnn", dict(K=4, V=5), "torch", "scan", (7,)),
    ("gla.rnn", dict(K=4, V=5), "torch", "chunk", (7,)),
    ("gla.rnn", dict(K=4, V=5), "torch", "auto", (7,)),
    ("gla.rnn", dict(K=4, V=5), "cpp", "sequential", (7,)),
    ("pararnn_gru.rnn", dict(d_in=4, d=5), "torch", "newton", ()),
]
# lengths and batch sizes none of which equals a dim or a head count in the first call (Dynamo
# gives equal sizes one symbol, and a dim's size is a constant: a length equal to it would be
# specialised)
SIZES = [(2, 6), (3, 6), (2, 33), (3, 33), (2, 70), (3, 70)]


class Model(torch.nn.Module):
    """An rcc cell between two torch layers, every result used."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, *xs, initial_state=None):
        y, final = self.cell(*xs, initial_state=initial_state)
        y = y[0] if isinstance(y, tuple) else y
        return torch.tanh(self.scale * y).sum() + sum(torch.tanh(s).sum() for s in final.values())


def build(cell_file, dims, backend, plan):
    torch.manual_seed(0)
    cls = rcc.compile(f"{STDLIB}/{cell_file}", backend=backend, plan=plan)
    return Model(cls(**dims).double())


def inputs(model, B, T, heads, seed=0):
    g = torch.Generator().manual_seed(seed + 97 * B + T)
    cell = model.cell
    xs = [torch.randn(B, T, *heads, *cell.shapes[n], generator=g, dtype=torch.float64)
          for n in cell.INPUTS]
    if "gk" in cell.INPUTS:  # GLA's gate arrives in log space (<= 0)
        i = cell.INPUTS.index("gk")
        xs[i] = -torch.nn.functional.softplus(xs[i])
    return [x.requires_grad_() for x in xs]


def loss_and_grads(fn, model, xs, **kw):
    loss = fn(*xs, **kw)
    leaves = [*xs, *model.parameters()]
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def assert_close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell_file, dims, backend, plan, heads", CASES)
def test_no_graph_break_no_recompile_and_equal_to_eager(cell_file, dims, backend, plan, heads):
    model = build(cell_file, dims, backend, plan)
    dynamo.reset()
    explained = dynamo.explain(model)(*inputs(model, 2, 6, heads))
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for B, T in SIZES:
        xs = inputs(model, B, T, heads)
        got = loss_and_grads(compiled, model, xs)
        want = loss_and_grads(model, model, [x.detach().requires_grad_() for x in xs])
        assert_close(got, want)
    assert counter.frame_count == 1  # one graph for every length and batch size
    assert counter.op_count >= 1


def test_inductor_compiles_a_model_with_a_cell():
    model = build("lstm.rnn", dict(d_in=4, d=5), "torch", "sequential")
    dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True)  # Inductor, the default
    for B, T in SIZES[:3]:
        xs = inputs(model, B, T, ())
        assert_close(loss_and_grads(compiled, model, xs),
                     loss_and_grads(model, model, [x.detach().requires_grad_() for x in xs]))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_initial_state_under_compile(backend):
    model = build("gla.rnn", dict(K=4, V=5), backend, "sequential")
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    for B, T in SIZES[:3]:
        xs = inputs(model, B, T, (7,))
        S = torch.randn(B, 7, 4, 5, dtype=torch.float64, requires_grad=True)
        for given in ({"S": S}, S):  # a dict by state name, or the one state's tensor
            got = loss_and_grads(compiled, model, [*xs], initial_state=given)
            want = loss_and_grads(model, model, [*xs], initial_state=given)
            assert_close(got, want)
        loss = compiled(*xs, initial_state={"S": S})
        (gs,) = torch.autograd.grad(loss, [S])
        (ws,) = torch.autograd.grad(model(*xs, initial_state={"S": S}), [S])
        assert_close([gs], [ws])


def test_a_bad_call_under_compile_is_eager_s_error():
    model = build("lstm.rnn", dict(d_in=4, d=5), "torch", "sequential")
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    with pytest.raises(ValueError, match=r"input 'x' has shape \[2, 6, 7\] but LSTM expects"):
        compiled(torch.randn(2, 6, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="initial state 'c' has shape"):
        compiled(torch.randn(2, 6, 4, dtype=torch.float64),
                 initial_state={"c": torch.zeros(3, 5, dtype=torch.float64)})


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_export_with_a_dynamic_length_and_batch(backend):
    model = build("lstm.rnn", dict(d_in=4, d=5), backend, "auto" if backend == "torch" else
                  "sequential")
    T, B = torch.export.Dim("T", min=2, max=1 << 16), torch.export.Dim("B", min=2, max=1024)
    program = torch.export.export(model, tuple(inputs(model, 2, 9, ())),
                                  dynamic_shapes=(({0: B, 1: T},),))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert (torch.ops.rcc.cell.default if backend == "torch" else torch.ops.rcc.cpp_loop.default
            ) in ops
    for B, T in SIZES:
        xs = inputs(model, B, T, ())
        torch.testing.assert_close(program.module()(*xs), model(*xs), rtol=1e-12, atol=1e-12)


def test_opcheck_on_the_ops():
    model = build("gla.rnn", dict(K=4, V=5), "torch", "chunk")
    cell = model.cell
    xs = inputs(model, 2, 11, (7,))
    S = torch.randn(2, 7, 4, 5, dtype=torch.float64, requires_grad=True)
    params = list(cell.parameters())
    torch.library.opcheck(torch.ops.rcc.cell.default, (cell._op_key, xs, params, "S", [S]))
    torch.library.opcheck(torch.ops.rcc.cell.default, (cell._op_key, xs, params, "", []))
    grads = [torch.randn(2, 11, 7, 5, dtype=torch.float64), None]
    torch.library.opcheck(torch.ops.rcc.cell_backward.default,
                          (cell._op_key, [x.detach() for x in xs], params, "S", [S.detach()],
                           grads, [True, False, True, True, True], None))  # no grad for k


def test_each_copy_is_its_own_op_key_and_compiles():
    model = build("pararnn_gru.rnn", dict(d_in=4, d=5), "torch", "newton")
    twin = copy.deepcopy(model)
    assert twin.cell._op_key != model.cell._op_key
    twin.cell.tol = 1e-3  # a setting of the copy only: the op must run the copy
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    dynamo.reset()
    xs = inputs(model, 2, 33, ())
    for m in (model, twin):
        compiled = torch.compile(m, backend="aot_eager", dynamic=True, fullgraph=True)
        assert_close(loss_and_grads(compiled, m, xs), loss_and_grads(m, m, xs))


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_on_the_cpp_loop_ops(save):
    """Backend cpp's loop is its own op (its forward traced around it): checked with the LSTM's
    loop as its generated module calls it."""
    cell = build("lstm.rnn", dict(d_in=4, d=5), "cpp", "sequential").cell
    N, T, d = 3, 7, 5
    g = torch.Generator().manual_seed(0)
    v = torch.randn(N, T, 4 * d, generator=g, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
              for _ in range(2)]
    tensors = [v, cell.weight_hh, cell.bias_ih, cell.bias_hh, *states]
    key = cell._kernel().key
    if not save:  # a loop run without saving its states has no backward (rcc.runtime.cpp.run)
        tensors = [t.detach() for t in tensors]
    torch.library.opcheck(torch.ops.rcc.cpp_loop.default,
                          (key, "forward", T, N, 1, 3, [d], save, tensors))
    if save:
        results = torch.ops.rcc.cpp_loop(key, "forward", T, N, 1, 3, [d], True,
                                         [t.detach() for t in tensors])
        grads = [torch.randn(N, T, d, dtype=torch.float64), None, torch.ones(N, d,
                                                                             dtype=torch.float64)]
        torch.library.opcheck(torch.ops.rcc.cpp_loop_backward.default,
                              (key, T, N, 1, 3, [d], [t.detach() for t in tensors],
                               results[3:], grads))


def test_cpp_loop_is_an_op_in_the_graph():
    model = build("lstm.rnn", dict(d_in=4, d=5), "cpp", "sequential")
    T, B = torch.export.Dim("T", min=2, max=1 << 16), torch.export.Dim("B", min=2, max=1024)
    program = torch.export.export(model, tuple(inputs(model, 2, 9, ())),
                                  dynamic_shapes=(({0: B, 1: T},),))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.rcc.cpp_loop.default in ops  # the projections before it are traced
    assert torch.ops.aten.linear.default in ops


@pytest.mark.parametrize("cell_file, dims, plan, heads", [
    ("lstm.rnn", dict(d_in=4, d=5), "sequential", ()),
    ("gla.rnn", dict(K=4, V=5), "chunk", ()),
])
def test_backend_triton_under_compile(cell_file, dims, plan, heads):
    """Backend triton (here in Triton's interpreter, on CPU) is the module-level op too."""
    model = build(cell_file, dims, "triton", plan)
    dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for B, T in [(2, 6), (3, 9)]:
        xs = inputs(model, B, T, heads)
        got = loss_and_grads(compiled, model, xs)
        want = loss_and_grads(model, model, [x.detach().requires_grad_() for x in xs])
        assert_close(got, want)
    assert counter.frame_count == 1


@pytest.mark.parametrize("cell_file, cell, dims, graph", [
    ("mdrnn.rnn", None, dict(d_in=4, d=5), "grid"),
    ("treelstm.rnn", "ChildSumTreeLSTM", dict(d_in=4, d=5), "dag"),
])
def test_cells_over_graphs_are_one_op_too(cell_file, cell, dims, graph):
    """A grid2d or dag cell's schedule is data (built from the grid's size or edge_index):
    under compilation the cell is one op, no graph break, its results equal to eager."""
    torch.manual_seed(0)
    m = rcc.compile(f"{STDLIB}/{cell_file}", cell=cell)(**dims).double()

    def loss(x, **kw):
        y, final = m(x, **kw)
        return y.tanh().sum() + sum(s.sin().sum() for s in final.values())
    if graph == "grid":
        xs = [torch.randn(2, X, Y, 4, dtype=torch.float64) for X, Y in ((3, 6), (7, 2))]
        kws = [{}, {}]
    else:
        xs = [torch.randn(2, n, 4, dtype=torch.float64) for n in (6, 9)]
        kws = [{"edge_index": torch.tensor([[0, 1, 2, 3], [3, 3, 4, 5]])},
               {"edge_index": torch.tensor([[0, 1, 4, 6, 7], [2, 2, 5, 8, 8]])}]
    dynamo.reset()
    explained = dynamo.explain(loss)(xs[0], **kws[0])
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(loss, backend="aot_eager", dynamic=True, fullgraph=True)
    for x, kw in zip(xs, kws):
        x = x.requires_grad_()
        got = [compiled(x, **kw)]
        got += torch.autograd.grad(got[0], [x, *m.parameters()])
        want = [loss(x, **kw)]
        want += torch.autograd.grad(want[0], [x, *m.parameters()])
        assert_close(got, want)
