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


# ---- every expression form of the semantics suite, on backend cpp ------------------------------
# Each group of test_semantics_ops.py's expressions becomes one cell with an output per expression
# (one C++ build per group), checked against the same per-element reference.
import test_semantics_ops as ops  # noqa: E402
from semantics_harness import instantiate, run_and_compare, run_python  # noqa: E402

GROUPS = {name: getattr(ops, name) for name in (
    "ARITHMETIC", "COMPARISONS", "MATMUL", "REDUCTIONS", "BUILDERS", "INDEXING", "TRANSPOSES",
    "DIM_VALUES")}
GROUPS["UNARY"] = ops._unary_cases()


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_cpp_expression_forms(group):
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
    m = instantiate(source, backend="cpp", **dims)

    def step(v):
        out = {}
        for k, e in enumerate(exprs):
            ref = cases[e]
            out["y" if k == 0 else f"y{k}"] = ref(v) if ref else run_python("", vars(v), e)
        return out
    run_and_compare(m, step, B=B, T=T, heads=heads)


# ---- calling conventions, errors, build cache --------------------------------------------------
def test_noncontiguous_inputs_and_a_grad_of_the_final_state_only():
    ref, mod = _pair("gru.rnn", {"d_in": 3, "d": 4}, torch.float64)
    x = torch.randn(9, 2, 3, dtype=torch.float64).transpose(0, 1).requires_grad_()  # [B, T, d]
    assert not x.is_contiguous()
    (_, fr), (_, fm) = ref(x), mod(x)
    torch.testing.assert_close(fm["h"], fr["h"], **F64)
    gr, = torch.autograd.grad(fr["h"].sum(), x)
    gm, = torch.autograd.grad(fm["h"].sum(), x)
    torch.testing.assert_close(gm, gr, **F64)


def test_cpp_runs_plan_sequential_only():
    with pytest.raises(NotImplementedError, match="plan 'sequential'"):
        rcc.compile(stdlib("mingru.rnn"), backend="cpp", plan="scan")


def test_no_compiler_is_a_clear_error(monkeypatch):
    from rcc.runtime import cpp
    cls = rcc.compile(stdlib("hgrn.rnn"), backend="cpp")
    monkeypatch.setenv("CXX", "no-such-compiler-rcc")
    monkeypatch.setattr(cpp, "_BY_SOURCE", {})
    with pytest.raises(cpp.CompilerNotFound, match="C\\+\\+17 compiler"):
        cls(d=2)


def test_build_is_cached_on_disk(monkeypatch):
    from rcc.runtime import cpp
    cls = rcc.compile(stdlib("hgrn.rnn"), backend="cpp")
    first = cls(d=5)._kernel().paths[torch.float32]
    monkeypatch.setattr(cpp, "_BY_SOURCE", {})  # as a new process: only the disk cache is left
    monkeypatch.setattr(cpp, "_build", None)  # never called when the cache has the kernel
    assert cls(d=5)._kernel().paths[torch.float32] == first


def test_generated_module_runs_without_the_compiler_packages(tmp_path):
    """The emitted module needs torch, rcc.runtime and a C++ compiler: not lark or sympy."""
    import subprocess
    import sys
    path = tmp_path / "lstm_cpp.py"
    path.write_text(rcc.generate(stdlib("lstm.rnn"), backend="cpp"))
    code = "\n".join([
        "import sys, importlib.util, torch",
        f"spec = importlib.util.spec_from_file_location('lstm_cpp', {str(path)!r})",
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
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
