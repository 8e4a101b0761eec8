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
    m = cls(d=5)
    assert set(m._kernel().paths) == {("forward", torch.float32)}  # no backward yet
    x = torch.randn(1, 3, 5, requires_grad=True)
    m(x, torch.randn(1, 3, 5))  # a call that will need the backward starts its build
    first = m._kernel().wait().paths
    assert set(first) == {("forward", torch.float32), ("backward", torch.float32)}
    monkeypatch.setattr(cpp, "_BY_SOURCE", {})  # as a new process: only the disk cache is left
    monkeypatch.setattr(cpp, "_build", None)  # never called when the cache has the kernel
    m = cls(d=5)
    m(x, torch.randn(1, 3, 5))
    assert m._kernel().wait().paths == first


def test_a_module_converted_to_float64_builds_no_float32_backward():
    cls = rcc.compile(stdlib("hgrn.rnn"), backend="cpp")
    m = cls(d=6).double()
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    y, _ = m(x, torch.randn(1, 3, 6, dtype=torch.float64))
    y.sum().backward()
    assert set(m._kernel().wait().paths) == {
        ("forward", torch.float32), ("forward", torch.float64), ("backward", torch.float64)}


def test_a_failed_background_build_fails_the_backward_that_needs_it(monkeypatch):
    from rcc.runtime import cpp

    def broken(cxx, text, key):
        if "#define RCC_PART 2" in text:
            raise RuntimeError("the backward's build failed")
        return real(cxx, text, key)
    real = cpp._build
    monkeypatch.setattr(cpp, "_BY_SOURCE", {})
    fresh = _fresh_dir()
    monkeypatch.setattr(cpp, "cache_dir", lambda: fresh)
    monkeypatch.setattr(cpp, "_build", broken)
    m = rcc.compile(stdlib("hgrn.rnn"), backend="cpp")(d=4)
    x, g = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4)
    y, _ = m(x, g)  # the forward runs
    with pytest.raises(RuntimeError, match="backward's build failed"):
        y.sum().backward()


def _fresh_dir():
    import tempfile
    return tempfile.mkdtemp(prefix="rcc-test-cpp-")
