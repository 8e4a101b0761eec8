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
