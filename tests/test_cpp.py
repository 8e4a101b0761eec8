"""Backend 'cpp': what is particular to it (its equality with the torch reference on every cell
is in test_kernel_backends.py)."""
import pytest
import torch

import rcc
from conftest import stdlib


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
