"""The kernel backends (cpp, triton) equal the torch reference on every stdlib cell: outputs,
final states and gradients (inputs, params, initial states), float64 and float32, T=1 and odd
T, heads; and on every expression form of the semantics suite. Triton runs in its interpreter on
CPU (TRITON_INTERPRET=1, set by conftest.py)."""
import math

import pytest
import torch

import rcc
from conftest import STDLIB_DIMS, cell_inputs, run_with_grads, stdlib

BACKENDS = ["cpp", "triton"]


def _pair(name, dims, dtype, backend="cpp"):
    ref = rcc.compile(stdlib(name), backend="torch", plan="sequential")(**dims).to(dtype)
    mod = rcc.compile(stdlib(name), backend=backend)(**dims).to(dtype)
    if hasattr(mod, "chunk_size"):  # plan chunk: one sub-chunk a chunk, cheaper in the interpreter
        mod.chunk_size = 16  # (chunks of 64 and their sub-chunks: tests/test_triton_chunk.py)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(STDLIB_DIMS))
@pytest.mark.parametrize("T", [1, 7])
def test_equals_torch_float64(backend, name, T):
    ref, mod = _pair(name, STDLIB_DIMS[name], torch.float64, backend)
    _compare(ref, mod, 3, T, (2,), torch.float64, F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(STDLIB_DIMS))
def test_equals_torch_float32(backend, name):
    ref, mod = _pair(name, STDLIB_DIMS[name], torch.float32, backend)
    _compare(ref, mod, 2, 5, (), torch.float32, F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_and_a_grad_of_the_final_state_only(backend):
    ref, mod = _pair("gru.rnn", {"d_in": 3, "d": 4}, torch.float64, backend)
    x = torch.randn(9, 2, 3, dtype=torch.float64).transpose(0, 1).requires_grad_()  # [B, T, d]
    assert not x.is_contiguous()
    (_, fr), (_, fm) = ref(x), mod(x)
    torch.testing.assert_close(fm["h"], fr["h"], **F64)
    gr, = torch.autograd.grad(fr["h"].sum(), x)
    gm, = torch.autograd.grad(fm["h"].sum(), x)
    torch.testing.assert_close(gm, gr, **F64)


# ---- backend cpp's whole-step entry point ------------------------------------------------------
# A call of a few rows without gradients (decoding) runs rcc_whole_steps, which computes the input
# projections in the loop too; every other call runs the hoisted kernel tested above.
@pytest.mark.parametrize("name", sorted(STDLIB_DIMS))
def test_cpp_whole_step_entry_equals_torch(name):
    from rcc.runtime import cpp
    ref, mod = _pair(name, STDLIB_DIMS[name], torch.float64)
    for B, T, heads in ((1, 1, ()), (1, 2, (2,))):
        assert B * T * math.prod(heads) <= cpp.FEW_ROWS
        xs, init = cell_inputs(ref, B, T, heads, torch.float64)
        with torch.no_grad():
            want, got = ref(*xs, initial_state=init), mod(*xs, initial_state=init)
        for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
            torch.testing.assert_close(g, w, **F64)
    assert ("whole_steps", torch.float64) in mod._kernel().paths


def test_cpp_takes_the_whole_step_entry_for_few_rows_without_gradients_only(monkeypatch):
    from rcc.runtime import cpp
    _, mod = _pair("lstm.rnn", {"d_in": 3, "d": 4}, torch.float64)
    real, taken = cpp._forward, []

    def spy(meta, tensors, save, entry="forward"):
        taken.append(entry)
        return real(meta, tensors, save, entry)
    monkeypatch.setattr(cpp, "_forward", spy)
    few, many = torch.randn(1, cpp.FEW_ROWS, 3, dtype=torch.float64), \
        torch.randn(1, cpp.FEW_ROWS + 1, 3, dtype=torch.float64)
    with torch.no_grad():
        mod(few), mod(many)
    mod(few)
    assert taken == ["whole_steps", "forward", "forward"]


@pytest.mark.parametrize("group", ["MATMUL", "REDUCTIONS", "INDEXING", "BUILDERS"])
def test_cpp_whole_step_entry_expression_forms(group):
    with torch.no_grad():
        _expression_forms("cpp", group, B=1, T=1, heads=(2,), grads=False)


# ---- every expression form of the semantics suite --------------------------------------------
# Each group of test_semantics_ops.py's expressions becomes one cell with an output per expression
# (one build per group), checked against the same per-element reference.
import test_semantics_ops as ops  # noqa: E402
from semantics_harness import instantiate, run_and_compare, run_python  # noqa: E402

GROUPS = {name: getattr(ops, name) for name in (
    "ARITHMETIC", "COMPARISONS", "MATMUL", "REDUCTIONS", "BUILDERS", "INDEXING", "TRANSPOSES",
    "DIM_VALUES")}
GROUPS["UNARY"] = ops._unary_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_expression_forms(backend, group):
    _expression_forms(backend, group)


def _expression_forms(backend, group, **sizes):
    config = "d3e2"
    cases = {}
    for param in GROUPS[group]:
        expr, ref, cfg = param.values
        if cfg == config:
            cases.setdefault(expr, ref)
    exprs = list(cases)
    outputs = "\n".join(f"    output y{k} = {e}" for k, e in enumerate(exprs[1:], 1))
    source = ops.ZOO.format(lines="", expr=exprs[0] + "\n" + outputs)
    dims, B, T, heads = ops.CONFIGS[config]
    sizes = {"B": B, "T": T, "heads": heads, **sizes}
    m = instantiate(source, backend=backend, **dims)

    def step(v):
        out = {}
        for k, e in enumerate(exprs):
            ref = cases[e]
            out["y" if k == 0 else f"y{k}"] = ref(v) if ref else run_python("", vars(v), e)
        return out
    run_and_compare(m, step, **sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_module_runs_without_the_compiler_packages(backend, tmp_path):
    """The emitted module needs torch, rcc.runtime and its backend's tools (a C++ compiler,
    triton): not lark or sympy."""
    import os
    import subprocess
    import sys
    path = tmp_path / f"lstm_{backend}.py"
    path.write_text(rcc.generate(stdlib("lstm.rnn"), backend=backend))
    code = "\n".join([
        "import sys, importlib.util, torch",
        f"spec = importlib.util.spec_from_file_location('lstm_{backend}', {str(path)!r})",
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)",
        "m = mod.LSTM(d_in=3, d=4)",
        "x = torch.randn(2, 5, 3, requires_grad=True)",
        "y, final = m(x)",
        "(y.sum() + final['c'].sum()).backward()",
        "assert x.grad is not None",
        "bad = [k for k in ('lark', 'sympy') if k in sys.modules]",
        "assert not bad, bad",
        "print('ok')",
    ])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cell_that_reads_no_input(backend):
    """Its inputs are declared but unused: the backward has only the initial state's gradient
    (backend triton's launcher took its device from the first input)."""
    src = """cell M(K, V) {
    input q[K]
    state S[K, V]
    S' = 0.5 * S + 0.5 * S[:, 0:1]
    output o = sum(S' * S', 0)
}"""
    ref = rcc.compile(src, backend="torch", plan="sequential")(K=3, V=4).double()
    mod = rcc.compile(src, backend=backend)(K=3, V=4).double()
    _compare(ref, mod, 2, 3, (), torch.float64, F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_value_folded_to_a_number_keeps_its_shape(backend):
    """`0.0 * S` folds to the number 0 in backend triton's pointwise printer; a slice of it then
    needs the [K, V] tile (found by a randomised campaign on the kernel backends)."""
    src = """cell M(K, V) {
    input q[K], k[K], v[V]
    state S[K, V]
    S_0 = 0.0 * S
    S' = concat(S_0[:, 1:V], S_0[:, 0:1], axis=1) + outer(k, v)
    output o = q @ S'
}"""
    ref = rcc.compile(src, backend="torch", plan="sequential")(K=3, V=4).double()
    mod = rcc.compile(src, backend=backend, plan="sequential")(K=3, V=4).double()
    _compare(ref, mod, 2, 5, (), torch.float64, F64)
