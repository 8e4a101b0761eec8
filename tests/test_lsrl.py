"""rcc.lsrl and `rcc lsrl`: LSRL programs compiled into stacks of layers with set weights, checked
against the program itself (the cell's own torch module) on the programs' inputs."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import rcc
import rcc.lsrl
from rcc.lsrl.cli import compare

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLES = os.path.join(ROOT, "examples", "lsrl")
# the programs, their prompts and the targets each compiles to: the examples' own list
_spec = importlib.util.spec_from_file_location(
    "lsrl_programs", os.path.join(ROOT, "examples", "lsrl_programs.py"))
programs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(programs)
PROGRAMS, lookup_prompts = programs.PROGRAMS, programs.lookup_prompts


def _example(name):
    return os.path.join(EXAMPLES, name)


CASES = [pytest.param(f, c, d, p, t, exact32, id=f"{c or f}-{t}")
         for f, c, d, p, targets, exact32 in PROGRAMS for t in targets]


def _outputs(module, stack, x, dtype):
    want, _ = module.to(dtype)(x.to(dtype))
    got = stack.to(dtype)(x.to(dtype))
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    return want, got


@pytest.mark.parametrize("path,cell,dims,prompts,target,exact32", CASES)
def test_examples_compile_to_stacks_equal_to_the_program(path, cell, dims, prompts, target,
                                                         exact32):
    module, prog = rcc.lsrl.program(_example(path), cell=cell, dims=dims)
    stack = rcc.lsrl.compile(_example(path), to=target, cell=cell, dims=dims)
    gen = torch.Generator().manual_seed(1)
    size = next(iter(dims.values()))
    for T in (1, 2 * size - 1, 2 * size, 2 * size + 1, 17):
        x = prompts(4, size, T, gen)
        want, got = _outputs(module, stack, x, torch.float64)
        for w, g in zip(want, got):
            assert torch.equal(w, g), (T, (w - g).abs().max())
        want, got = _outputs(module, stack, x, torch.float32)
        for w, g in zip(want, got):
            if exact32:
                assert torch.equal(w, g), (T, (w - g).abs().max())
    if not exact32:
        # the paper's point: f_ifelse's large constant (1e10) is fragile. The program gets these
        # integer prompts right in float32, but the stack's layers add terms of 1e13 that cancel,
        # and a float32 sum of them keeps none of the value's digits
        x = prompts(4, size, 17, gen)
        want32, got32 = _outputs(module, stack, x, torch.float32)
        want64, _ = _outputs(module, stack, x, torch.float64)
        assert torch.equal(want32[0].double(), want64[0])
        assert (got32[0] - want32[0]).abs().max() > 1


@pytest.mark.parametrize("path,cell,dims,prompts,target,exact32", CASES[:5])
def test_stacks_agree_on_any_input_to_rounding(path, cell, dims, prompts, target, exact32):
    module, _ = rcc.lsrl.program(_example(path), cell=cell, dims=dims)
    stack = rcc.lsrl.compile(_example(path), to=target, cell=cell, dims=dims)
    # random inputs in [-2, 2] land on f_step's ramps (slope 1000), which scale rounding
    assert compare(module, stack, lengths=(1, 9, 33)) < 1e-9


def test_the_modulo_counter_and_its_stack():
    module, _ = rcc.lsrl.program(_example("counting.rnn"), dims={"n": 5})
    stack = rcc.lsrl.compile(_example("counting.rnn"), to="linear", dims={"n": 5})
    x = torch.ones(2, 23, dtype=torch.float64)
    (more, position), _ = module(x)
    assert torch.equal(position[0], torch.arange(23, dtype=torch.float64) % 5)
    assert torch.equal(more[0], torch.ones(23, dtype=torch.float64))
    assert torch.equal(stack(x)[1], position)


def test_a_program_with_params_vectors_and_old_state_reads():
    """Vector inputs, a param matrix, a state read before its update (kept one more step)."""
    src = """
    cell P(d = 3) {
        input x[d]
        param W[2, d]
        state s[2]
        y = relu(W @ x - s)            # reads s before its update
        s' = 0.5 * s + W @ x
        output y = y
        output z = max(s', 0.25) + abs(x[0])
    }
    """
    module, prog = rcc.lsrl.program(src)  # a new module: params from the cell's initializers
    stack = rcc.lsrl.compile(src, to="linear", module=module)
    assert compare(module, stack, lengths=(1, 4, 9)) < 1e-12
    # a param set in the module is used
    with torch.no_grad():
        module.W.mul_(3)
    stack3 = rcc.lsrl.compile(src, to="linear", module=module)
    assert compare(module, stack3) < 1e-12 and compare(module, stack) > 1e-3


@pytest.mark.parametrize("target", ["linear", "gru"])
def test_products_have_no_construction_on_targets_linear_and_gru(target):
    src = "use lsrl\ncell C() {\n  input c, t\n  output y = f_ifelse_mul(c, t, 0)\n}\n"
    with pytest.raises(rcc.CompileError, match="Multiplicative.*no construction") as e:
        rcc.lsrl.compile(src, to=target)
    # at the use of f_ifelse_mul, with a note at the product in its body
    assert (e.value.filename, e.value.line, e.value.col) == ("<string>", 4, 14)
    assert e.value.notes[0][1].filename == "stdlib/lsrl.rnn"


def test_products_on_mamba_and_lstm():
    src = "use lsrl\ncell C() {\n  input c, t\n  output y = f_ifelse_mul(c, t, 0)\n}\n"
    c = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[3.0, -7.5, 0.25, 9.0, 1e3]], dtype=torch.float64)
    for target in ("mamba", "lstm"):
        module, stack = _pair(src, target)
        assert torch.equal(stack(c, t), module(c, t)[0])
    # on mamba a general product is exact to the rounding of b + 64; the LSTM thresholds its
    # left factor at 1/2 (a condition's gate)
    module, stack = _pair(src, "mamba")
    assert compare(module, stack) < 1e-12
    module, stack = _pair(src, "lstm")
    assert compare(module, stack) > 0.1


def _pair(src, to):
    module, _ = rcc.lsrl.program(src)
    return module, rcc.lsrl.compile(src, to=to, module=module)


@pytest.mark.parametrize("body,line,message", [
    ("output y = tanh(x)", 3, r"tanh\(\) is not an LSRL primitive"),
    ("output y = x > 0", 3, "f_larger"),
    ("output y = 1 / x", 3, "a division by a value"),
    ("state s\n  s' = relu(s) + x\n  output s'", 4, "loop through a relu"),
])
def test_cells_that_are_not_lsrl_programs_are_located_errors(body, line, message):
    src = f"cell C() {{\n  input x\n  {body}\n}}\n"
    with pytest.raises(rcc.CompileError, match=message) as e:
        rcc.lsrl.compile(src, to="linear")
    assert e.value.line == line


@pytest.mark.parametrize("target", ["mamba", "hawk"])
def test_diagonal_targets_refuse_a_rotation_with_its_location(target):
    with pytest.raises(rcc.CompileError, match="non-diagonal transition") as e:
        rcc.lsrl.compile(_example("counting.rnn"), to=target)
    assert e.value.filename.endswith("counting.rnn") and e.value.line == 11  # the counter's use
    assert e.value.notes[0][1].filename == "stdlib/lsrl.rnn"  # the rotation's update


@pytest.mark.parametrize("path,cell,dims,prompts,tolerance", [
    ("lookup.rnn", "LookupMul", {"K": 3}, programs.lookup_prompts, 1e-7),
    ("approximation.rnn", "ApproximateMul", {"N": 4}, programs.approximation_prompts, 1e-7),
])
def test_hawk_stacks_are_close_in_float64(path, cell, dims, prompts, tolerance):
    """Hawk's RG-LRU cannot hold a decay of 1 with an input: its counters run a = 1 to rounding,
    the input scaled by 1 / sqrt(1 - a^2) = 2^30 to rounding, so they drift by ~1e-16 a step."""
    module, _ = rcc.lsrl.program(_example(path), cell=cell, dims=dims)
    stack = rcc.lsrl.compile(_example(path), to="hawk", cell=cell, dims=dims, module=module)
    gen = torch.Generator().manual_seed(2)
    size = next(iter(dims.values()))
    for T in (1, 2 * size + 1, 20):
        want, got = _outputs(module, stack, prompts(4, size, T, gen), torch.float64)
        assert (want[0] - got[0]).abs().max() < tolerance


def test_dims_without_a_value_and_unknown_targets():
    with pytest.raises(rcc.CompileError, match="needs a value"):
        rcc.lsrl.compile("cell C(d) {\n input x[d]\n output y = x\n}\n")
    with pytest.raises(ValueError, match="unknown target"):
        rcc.lsrl.compile(_example("counting.rnn"), to="transformer")


def test_the_lsrl_program_runs_its_scan_plan():
    """The rotation counter is two coupled scalar states: a block scan."""
    cls = rcc.compile(_example("counting.rnn"), plan="scan")
    seq = rcc.compile(_example("counting.rnn"), plan="sequential")
    x = torch.randint(0, 2, (3, 40)).double()
    a, _ = cls(n=4).double()(x)
    b, _ = seq(n=4).double()(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rcc", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_cli_lsrl(tmp_path):
    out = tmp_path / "stack.pt"
    r = _cli("lsrl", "examples/lsrl/lookup.rnn", "--cell", "LookupMul", "--to", "mamba",
             "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "mamba stack of" in r.stdout and "largest difference" in r.stdout
    stack = torch.load(out, weights_only=False)
    x = lookup_prompts(2, 3, 9, torch.Generator().manual_seed(0))
    module, _ = rcc.lsrl.program(_example("lookup.rnn"), cell="LookupMul")
    assert torch.equal(stack(x), module(x)[0])
    r = _cli("lsrl", "examples/lsrl/counting.rnn", "--to", "mamba")
    assert r.returncode == 1 and "error: the LinState" in r.stderr and "Traceback" not in r.stderr
    r = _cli("lsrl", "--help")
    assert r.returncode == 0 and "linear" in r.stdout and "mamba" in r.stdout


def test_mamba_stacks_run_the_scan_and_stay_exact_on_long_prompts():
    module, _ = rcc.lsrl.program(_example("lookup.rnn"), cell="LookupMul")
    stack = rcc.lsrl.compile(_example("lookup.rnn"), to="mamba", cell="LookupMul", module=module)
    s6 = [st.s6 for st in stack.stages if hasattr(st, "s6")]
    assert s6 and all("plan scan)" in type(m).RCC_CODE.split("\n")[0] for m in s6)
    x = lookup_prompts(3, 3, 300, torch.Generator().manual_seed(3))
    for dtype in (torch.float64, torch.float32):
        want, got = _outputs(module, stack, x, dtype)
        assert torch.equal(want[0], got[0])
