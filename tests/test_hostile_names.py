"""Nothing from outside a cell's text runs when rcc prints and loads its module: paths and a
traced function's name and file enter generated code only escaped (rcc.codegen.doc_text, repr).

Every printer is walked (torch: every plan, graph cells; cpp: the fused loop and the graph
kernel; triton: the fused loop, plan chunk, the grid solve) with names that would close a
docstring ('\"\"\"', \"'''\"), form an escape (backslash-N) or break a line, each carrying a
payload that would create a marker file if it ran.
"""
import os
import shutil

import pytest
import torch

import rcc
from conftest import stdlib

PAYLOAD = '__import__("os").environ.__setitem__("RCC_PWNED", "1")'
HOSTILE = ['x""";{p};"""', "x''';{p};'''", "x\\N{{p}}", "x\n{p}\n", 'x\\";{p};\\"', "x#{p}"]

CASES = [  # (stdlib file, cell, backend, plan)
    ("mingru.rnn", None, "torch", "sequential"), ("mingru.rnn", None, "torch", "scan"),
    ("mingru.rnn", None, "torch", "auto"), ("pararnn_gru.rnn", None, "torch", "newton"),
    ("gla.rnn", None, "torch", "chunk"), ("deltanet.rnn", None, "torch", "chunk"),
    ("mingru.rnn", None, "cpp", "sequential"), ("mingru.rnn", None, "triton", "sequential"),
    ("gla.rnn", None, "triton", "chunk"), ("mdrnn.rnn", None, "torch", "sequential"),
    ("mdrnn.rnn", None, "cpp", "sequential"), ("plstm.rnn", "PLSTM2DP", "triton", "chunk"),
]


@pytest.fixture(params=range(len(HOSTILE)), ids=["triple-quote", "single-triple", "backslash-N",
                                                 "newline", "escaped-quote", "hash"])
def hostile(request):
    os.environ.pop("RCC_PWNED", None)
    yield HOSTILE[request.param].format(p=PAYLOAD)
    assert "RCC_PWNED" not in os.environ  # the payload never ran


@pytest.mark.parametrize("file,cell,backend,plan", CASES)
def test_paths_never_run(hostile, tmp_path, file, cell, backend, plan):
    folder = tmp_path / hostile
    folder.mkdir()
    path = folder / file
    shutil.copy(stdlib(file), path)
    cls = rcc.compile(path, cell=cell, backend=backend, plan=plan)
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_traced_function_name_and_file_never_run(hostile, backend):
    name = hostile
    text = ("def cell(x: rcc.Input['d'], h: rcc.State['d']):\n"
            "    return {\"h'\": rcc.tanh(h + x), 'y': h}\n")
    scope = {"rcc": rcc}
    exec(compile(text, name + ".py", "exec"), scope)  # a file name as hostile as the path above
    fn = scope["cell"]
    fn.__name__ = fn.__qualname__ = name + "\x00"
    cls = rcc.recurrence(fn, backend=backend)
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    if backend == "torch":
        m = cls(d=3)
        y, _ = m(torch.randn(2, 4, 3))
        assert y.shape == (2, 4, 3)


def test_doc_text_keeps_paths_readable():
    from rcc.codegen import doc_text

    assert doc_text("stdlib/gla.rnn") == "stdlib/gla.rnn"
    assert doc_text("C:\\cells\\Net.rnn") == "C:/cells/Net.rnn"
    assert all(c not in doc_text(h + "\x00é") for h in HOSTILE for c in "\"'\\\n\x00é")
