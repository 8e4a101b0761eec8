"""rcc.compile's front-end cache (rcc.frontcache): a source compiled before loads its generated code
without the compiler, and only while everything it was made from is unchanged."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import rcc
from rcc import frontcache

CELL = """use "gates.rnn"
cell G(d) {
    input x[d]
    state h[d]
    h' = gate(x) * h + x
    output y = h'
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RCC_NO_FRONT_CACHE", raising=False)
    (tmp_path / "gates.rnn").write_text("fn gate(x) = sigmoid(x)\n")
    (tmp_path / "cell.rnn").write_text(CELL)
    return tmp_path


def _entries(tmp_path):
    return glob.glob(str(tmp_path / "cache" / "front" / "*.json"))


def _run(cls, d=3):
    torch.manual_seed(0)
    m = cls(d=d).double()
    x = torch.randn(2, 4, d, dtype=torch.float64)
    return m(x)[0]


def test_a_second_compile_loads_the_same_class_without_the_compiler(cache, monkeypatch):
    first = rcc.compile(str(cache / "cell.rnn"), backend="torch", plan="sequential")
    assert len(_entries(cache)) == 1

    def no_compiler(*args, **kwargs):
        raise AssertionError("the compiler ran")
    monkeypatch.setattr(rcc.api, "_specialize", no_compiler)
    second = rcc.compile(str(cache / "cell.rnn"), backend="torch", plan="sequential")
    assert second.RCC_CODE == first.RCC_CODE
    assert torch.equal(_run(first), _run(second))


@pytest.mark.parametrize("backend,plan", [("torch", "auto"), ("cpp", "auto")])
def test_plan_auto_and_backend_cpp_are_cached_too(cache, monkeypatch, backend, plan):
    first = rcc.compile(str(cache / "cell.rnn"), backend=backend, plan=plan)
    monkeypatch.setattr(rcc.api, "_specialize", None)  # a miss would fail
    second = rcc.compile(str(cache / "cell.rnn"), backend=backend, plan=plan)
    assert torch.equal(_run(first), _run(second))
    if plan == "auto" and backend == "torch":
        assert second.PLAN_FACTS == first.PLAN_FACTS and set(second.PLAN_CLASSES) == {
            "sequential", "scan"}


def test_a_changed_used_file_or_rcc_is_a_miss(cache, monkeypatch):
    path = str(cache / "cell.rnn")
    first = rcc.compile(path, plan="sequential")
    (cache / "gates.rnn").write_text("fn gate(x) = tanh(x)\n")
    second = rcc.compile(path, plan="sequential")
    assert "tanh" in second.RCC_CODE and "tanh" not in first.RCC_CODE
    assert len(_entries(cache)) == 1  # the entry of this text now records the changed use
    monkeypatch.setattr(frontcache, "rcc_fingerprint", lambda: "another rcc")
    rcc.compile(path, plan="sequential")
    assert len(_entries(cache)) == 2  # another rcc: another key


def test_a_planted_module_or_a_corrupt_entry_is_a_miss(cache):
    path = str(cache / "cell.rnn")
    first = rcc.compile(path, plan="sequential")
    (module,) = glob.glob(str(cache / "cache" / "rcc_*.py"))
    with open(module, "w") as f:
        f.write("raise SystemExit('planted')\n")
    assert rcc.compile(path, plan="sequential").RCC_CODE == first.RCC_CODE  # recompiled
    with open(module) as f:
        assert f.read() == first.RCC_CODE  # and the file rewritten
    (entry,) = _entries(cache)
    with open(entry, "w") as f:
        f.write("{not json")
    assert rcc.compile(path, plan="sequential").RCC_CODE == first.RCC_CODE
    with open(entry) as f:
        assert json.load(f)["codes"]  # rewritten


def test_dims_fixed_at_generation_respecialize_from_a_hit(cache):
    src = "cell L(n = 2) {\n    input x\n    a = x\n    for j in 0..n { a = a + x }\n" \
          "    output y = a\n}\n"
    rcc.compile(src)
    cls = rcc.compile(src)  # a hit
    x = torch.ones(1, 3, dtype=torch.float64)
    assert torch.equal(cls(n=4).double()(x)[0], 5 * x)
    assert torch.equal(cls().double()(x)[0], 3 * x)


def test_errors_and_deferred_classes_are_not_cached(cache):
    with pytest.raises(rcc.CompileError):
        rcc.compile("cell C() {\n    input x\n    output y = z\n}\n")
    src = "cell L(n) {\n    input x\n    a = x\n    for j in 0..n { a = a + x }\n" \
          "    output y = a\n}\n"
    cls = rcc.compile(src)  # n has no default: the code waits for it
    assert not _entries(cache)
    assert torch.equal(cls(n=1).double()(torch.ones(1, 2, dtype=torch.float64))[0],
                       2 * torch.ones(1, 2, dtype=torch.float64))


def test_a_second_process_does_not_import_the_compiler(cache):
    script = ("import sys, rcc, torch\n"
              f"M = rcc.compile({str(cache / 'cell.rnn')!r})\n"
              "M(d=3)(torch.randn(1, 2, 3))\n"
              "print('lark' in sys.modules, 'sympy' in sys.modules)\n")
    env = dict(os.environ, RCC_CACHE_DIR=str(cache / "cache"))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, cwd=cache) for _ in range(2)]
    assert [r.stdout.strip() for r in runs] == ["True True", "False False"], runs[1].stderr
