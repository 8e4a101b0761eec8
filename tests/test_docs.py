"""The documentation stays true: docs/api.md is what docs/gen_api.py writes, and every example of
docs/language.md and docs/tutorial.md runs and prints what the page shows.

Conventions of the pages' fenced blocks (docs/language.md, "How to read this page"):

- ```rnn: a whole .rnn file that `rcc check` accepts. When its first line is a comment naming a
  file (`# qrnn.rnn ...`) it is saved under that name, else as example.rnn.
- ```rnn-error: a .rnn file saved the same way; the ```console block after it shows what rcc
  prints for it.
- ```console: `$ rcc ...` or `$ python FILE.py` commands, each followed by its exact output
  (stdout and stderr). They run in-process, in the page's folder.
- ```python: run in one namespace per page, in order; when its first line is a comment naming
  a file (`# traced.py ...`) it is saved under that name instead.
- ```pycon: doctest examples, run in the same namespace.

Other blocks (```text, ```bash, none) are not run. Each page runs in its own temporary folder.
"""
from __future__ import annotations

import contextlib
import difflib
import doctest
import importlib.util
import io
import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_FILE_LINE = re.compile(r"#\s*([\w./-]+\.(?:rnn|py))(?=[:\s]|$)")


def blocks(path):
    """(language, text, line) of each fenced block of a markdown file, in order."""
    text = open(path, encoding="utf-8").read()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in _FENCE.finditer(text)]


def file_name(body):
    """The file a block is saved as, when its first line is a comment naming one."""
    m = _FILE_LINE.match(body.split("\n", 1)[0])
    return m.group(1) if m else None


def run_command(line) -> str:
    """Run one `rcc ...` or `python FILE.py ...` command in-process; its stdout and stderr."""
    argv = shlex.split(line)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        if argv[0] == "rcc":
            from rcc.cli import main
            try:
                main(argv[1:])
            except SystemExit:  # argparse's usage errors
                pass
        elif argv[0] == "python" and len(argv) >= 2 and argv[1].endswith(".py"):
            saved = sys.argv
            sys.argv = argv[1:]
            try:
                runpy.run_path(argv[1], run_name="__main__")
            except SystemExit:
                pass
            finally:
                sys.argv = saved
        else:
            raise AssertionError(f"the docs may only show `rcc ...` and `python FILE.py`: {line}")
    return out.getvalue()


def console_steps(body):
    """[(command, expected output lines)] of a ```console block."""
    steps = []
    for line in body.rstrip("\n").split("\n"):
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line.rstrip())
        else:
            raise AssertionError(f"a console block starts with output, not a `$ ` command: {line}")
    return steps


def _lines(text):
    lines = [line.rstrip() for line in text.rstrip("\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


class Page:
    """Runs the blocks of one page in order, in the current folder; `failures` says what differs."""

    def __init__(self, path):
        self.path = path
        self.name = os.path.relpath(path, ROOT)
        self.namespace = {"__name__": "__docs__"}
        self.failures = []

    def run(self):
        for lang, body, line in blocks(self.path):
            where = f"{self.name}:{line}"
            handler = getattr(self, "block_" + lang.replace("-", "_"), None)
            if handler is not None:
                handler(body, where)
        return self.failures

    def _save(self, body, default):
        name = file_name(body) or default
        with open(name, "w", encoding="utf-8") as f:
            f.write(body)
        return name

    def block_rnn(self, body, where):
        name = self._save(body, "example.rnn")
        out = run_command(f"rcc check {name}")
        if ": ok" not in out or "error" in out:
            self.failures.append(f"{where}: `rcc check {name}` fails on an example shown as "
                                 f"valid:\n{out}")

    def block_rnn_error(self, body, where):
        self._save(body, "example.rnn")

    def block_console(self, body, where):
        for command, want in console_steps(body):
            got = _lines(run_command(command))
            if got != _lines("\n".join(want)):
                diff = "\n".join(difflib.unified_diff(want, got, "shown", "printed", lineterm=""))
                self.failures.append(f"{where}: `{command}` prints otherwise:\n{diff}")

    def block_python(self, body, where):
        if file_name(body):
            self._save(body, None)
            return
        try:
            exec(compile(body, where, "exec"), self.namespace)
        except Exception as e:  # noqa: BLE001 (reported with its place)
            self.failures.append(f"{where}: the python block raises {type(e).__name__}: {e}")

    def block_pycon(self, body, where):
        test = doctest.DocTestParser().get_doctest(body, self.namespace, where, where, 0)
        out = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test, out=out.write, clear_globs=False)
        if runner.failures:
            self.failures.append(f"{where}: the pycon block differs:\n{out.getvalue()}")


def run_page(path, folder, monkeypatch):
    """Run a page's blocks in `folder`; imports from it are forgotten afterwards."""
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    try:
        return Page(path).run()
    finally:
        for name in set(sys.modules) - before:
            mod = sys.modules.get(name)
            if os.path.dirname(os.path.abspath(getattr(mod, "__file__", None) or "/")) == \
                    os.path.abspath(folder):
                del sys.modules[name]


def test_api_md_is_current():
    spec = importlib.util.spec_from_file_location("gen_api", os.path.join(DOCS, "gen_api.py"))
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    with open(os.path.join(DOCS, "api.md"), encoding="utf-8") as f:
        written = f.read()
    assert written == gen_api.render(), ("docs/api.md is out of date with the docstrings: run "
                                         "`python docs/gen_api.py`")


@pytest.mark.parametrize("page", ["language.md", "tutorial.md"])
def test_page_examples(page, tmp_path, monkeypatch):
    failures = run_page(os.path.join(DOCS, page), tmp_path, monkeypatch)
    assert not failures, f"{len(failures)} examples of docs/{page} are not true:\n\n" + \
        "\n\n".join(failures)
