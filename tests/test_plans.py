"""Every legal plan equals the sequential reference on every stdlib cell it applies to: outputs,
final states and gradients (inputs, params, initial states), float64, odd T, with heads."""
import warnings

import pytest
import torch

import rcc
from conftest import STDLIB_DIMS as DIMS
from conftest import cell_inputs as _inputs
from conftest import run_with_grads as _run
from conftest import stdlib
from rcc.errors import CompileError

CASES = [(name, plan) for name in sorted(DIMS) for plan in rcc.analyze(stdlib(name)).plans
         if plan != "sequential"]


def _compare(name, plan, T, heads=(2,), backend="torch"):
    dims = DIMS[name]
    ref = rcc.compile(stdlib(name))(**dims).double()
    mod = rcc.compile(stdlib(name), plan=plan, backend=backend)(**dims).double()
    if plan == "chunk":
        mod.chunk_size = 4  # a module attribute, default 64
    mod.load_state_dict(ref.state_dict())
    xs, init = _inputs(ref, 2, T, heads)
    want, want_grads = _run(ref, xs, init)
    got, got_grads = _run(mod, xs, init)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    for w, g in zip(want_grads, got_grads):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)
    return mod


@pytest.mark.parametrize("name,plan", CASES)
@pytest.mark.parametrize("T", [1, 7, 9])  # 9: one more than two chunks of 4
def test_plan_equals_sequential(name, plan, T):
    _compare(name, plan, T)


# 40: more than one of the Triton scans' blocks of 32 steps; 13: four chunks of 4, the last
# partial (the chunk kernels' own tiling is tested at T = 70 and 130 in test_triton_chunk.py)
@pytest.mark.parametrize("name,plan,T", [(*c, T) for c in CASES if c[1] in rcc.api.TRITON_PLANS
                                         for T in ([1, 7, 13] if c[1] == "chunk" else [1, 7, 40])])
def test_triton_plan_equals_sequential(name, plan, T):
    _compare(name, plan, T, backend="triton")


@pytest.mark.parametrize("name,plan", [c for c in CASES if c[0] in ("mingru.rnn", "gla.rnn")])
def test_plan_without_heads(name, plan):
    _compare(name, plan, 5, heads=())


@pytest.mark.parametrize("name,plan", [
    ("gru.rnn", "scan"), ("lstm.rnn", "newton"), ("mingru.rnn", "newton"), ("gru.rnn", "chunk"),
    ("mingru.rnn", "chunk"),
])
def test_illegal_plan_names_the_state_and_reason(name, plan):
    with pytest.raises(CompileError) as e:
        rcc.compile(stdlib(name), plan=plan)
    msg = str(e.value)
    assert f"plan '{plan}'" in msg and "state 'h'" in msg and "legal plans" in msg


def test_newton_reports_its_iterations_and_residual():
    ref = rcc.compile(stdlib("pararnn_gru.rnn"))(d_in=3, d=4).double()
    mod = rcc.compile(stdlib("pararnn_gru.rnn"), plan="newton")(d_in=3, d=4).double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 300, 3, dtype=torch.float64)
    torch.testing.assert_close(mod(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)
    stats = mod.last_stats
    assert stats["converged"] and not stats["fallback"]
    assert 1 <= stats["iterations"] <= 8 and stats["residual"] < 1e-12


EXPANSIVE = """
cell Chaotic(d) {
    input x[d]
    param w[d] = 5
    state h[d]
    h' = tanh(w * h + x)
    output y = h'
}"""


def test_newton_where_plain_newton_diverges_is_still_right():
    """|dh'/dh| up to 5: undamped Newton's linearised solves blow up; the damped iteration (or
    the sequential finish, with a warning) must still give the sequential answer."""
    ref = rcc.compile(EXPANSIVE)(d=3).double()
    mod = rcc.compile(EXPANSIVE, plan="newton")(d=3).double()
    x = torch.randn(2, 200, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = mod(x)[0]
    torch.testing.assert_close(y, ref(x)[0], rtol=1e-9, atol=1e-9)
    stats = mod.last_stats
    assert stats["damped"] or stats["fallback"]
    assert torch.isfinite(y).all()
    # finishing sequentially is never silent
    said = any("finished sequentially" in str(w.message) for w in caught)
    assert said == stats["fallback"]


@pytest.mark.parametrize("name,dims", [("mingru.rnn", {"d_in": 3, "d": 5}),
                                       ("gla.rnn", {"K": 3, "V": 2}),
                                       ("pararnn_gru.rnn", {"d_in": 2, "d": 3}),
                                       ("lstm.rnn", {"d_in": 2, "d": 3})])
def test_auto_runs_a_legal_plan_and_matches_sequential(name, dims):
    ref = rcc.compile(stdlib(name), plan="sequential")(**dims).double()
    mod = rcc.compile(stdlib(name))(**dims).double()  # plan auto is the default
    mod.load_state_dict(ref.state_dict())
    for T in (1, 50):
        xs, init = _inputs(ref, 2, T, (2,))
        want, _ = _run(ref, xs, init)
        got, _ = _run(mod, xs, init)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        assert mod.last_plan in rcc.analyze(stdlib(name)).plans
        assert set(mod.last_estimates) == set(rcc.analyze(stdlib(name)).plans)


def test_scan_is_stable_over_a_long_sequence_with_decays_near_zero_and_one():
    ref = rcc.compile(stdlib("mingru.rnn"), plan="sequential")(d_in=1, d=2).double()
    mod = rcc.compile(stdlib("mingru.rnn"), plan="scan")(d_in=1, d=2).double()
    mod.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for m in (ref, mod):
            m.Wz.copy_(torch.tensor([[40.0], [-40.0]]))  # z near 1 (decay ~0) and near 0 (~1)
            m.bz.zero_()
    x = torch.randn(1, 20000, 1, dtype=torch.float64).abs()
    y1, f1 = ref(x)
    y2, f2 = mod(x)
    assert torch.isfinite(y2).all()
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-12)


def test_generated_plans_run_without_the_compiler(tmp_path):
    """Each plan's module needs torch and rcc.runtime only (never lark or sympy)."""
    import subprocess
    import sys

    cases = [("mingru.rnn", "scan", "d_in=2, d=3", "[torch.randn(2, 9, 2)]"),
             ("gla.rnn", "chunk", "K=2, V=3", "[torch.randn(2, 9, 2), torch.randn(2, 9, 2), "
              "torch.randn(2, 9, 3), -torch.rand(2, 9, 2)]"),
             ("pararnn_gru.rnn", "newton", "d_in=2, d=3", "[torch.randn(2, 9, 2)]")]
    lines = ["import importlib.util, sys", "import torch"]
    for k, (name, plan, dims, inputs) in enumerate(cases):
        path = tmp_path / f"gen_{k}.py"
        path.write_text(rcc.generate(stdlib(name), plan=plan))
        lines += [f"spec = importlib.util.spec_from_file_location('gen_{k}', {str(path)!r})",
                  "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)",
                  "cls = [v for v in vars(mod).values() if isinstance(v, type) and "
                  "issubclass(v, torch.nn.Module) and v.__module__ == mod.__name__][0]",
                  f"m = cls({dims})", f"xs = [x.requires_grad_() for x in {inputs}]",
                  "y, final = m(*xs)", "(y.sum() + sum(f.sum() for f in final.values())).backward()"]
    lines += ["assert 'lark' not in sys.modules and 'sympy' not in sys.modules, 'compiler loaded'",
              "print('ran ok')"]
    run = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ran ok" in run.stdout
