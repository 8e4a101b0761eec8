"""The `rcc` command line: exit status 0 ok, 1 compile error (printed with a caret, never a
traceback), 2 usage; `rcc compile` writes a module that runs without the compiler."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, stdlib

BAD = "cell C(d) {\n    input x[d]\n    output y = x + z\n}\n"


def rcc_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "rcc", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_check_ok():
    r = rcc_cli("check", stdlib("mingru.rnn"))
    assert r.returncode == 0, r.stderr
    assert "cell MinGRU: ok" in r.stdout
    assert r.stderr == ""


def test_check_a_stdlib_path_away_from_a_checkout(tmp_path):
    r = rcc_cli("check", "stdlib/mingru.rnn", cwd=tmp_path)
    assert r.returncode == 0 and "stdlib/mingru.rnn: cell MinGRU: ok" in r.stdout, r.stderr
    r = rcc_cli("check", "stdlib/nope.rnn", cwd=tmp_path)
    assert r.returncode == 2 and "no such file: stdlib/nope.rnn" in r.stderr


def test_explain_refuses_a_length_below_one_as_usage():
    r = rcc_cli("explain", stdlib("gla.rnn"), "--T", "0")
    assert r.returncode == 2 and "--T lengths must be at least 1" in r.stderr


def test_check_bad_file_prints_position_and_caret(tmp_path):
    path = tmp_path / "bad.rnn"
    path.write_text(BAD)
    r = rcc_cli("check", str(path))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{path}:3:20: error: unknown name 'z'",
        "        output y = x + z",
        "                       ^",
    ]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_check_refuses_what_compile_refuses_over_graphs(tmp_path):
    """A value per outgoing edge (it reads out_slot) updating a node state: rcc check says so,
    as rcc compile does (the graph printers' check ran only when code was printed)."""
    path = tmp_path / "slot.rnn"
    path.write_text("cell C(d) over dag {\n    input x[d], g[2]\n    state h[d]\n"
                    "    h' = g[out_slot] * sum_pred(h) + x\n    output y = x\n}\n")
    for command in ("check", "compile"):
        r = rcc_cli(command, str(path), cwd=tmp_path)
        assert r.returncode == 1, (command, r.stdout)
        assert r.stderr.startswith(f"{path}:4:36: error: the update of state 'h' reads out_slot")


def test_compile_bad_file_exits_1(tmp_path):
    path = tmp_path / "bad.rnn"
    path.write_text("cell C(d) {\n    input x[d]\n    output y = x +* x\n}\n")
    r = rcc_cli("compile", str(path), "-o", str(tmp_path / "out.py"))
    assert r.returncode == 1
    assert f"{path}:3:19: error: unexpected '*'" in r.stderr
    assert "                      ^" in r.stderr.splitlines()
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.py").exists()


def test_error_in_an_fn_prints_the_note(tmp_path):
    path = tmp_path / "fn.rnn"
    path.write_text("fn proj(W, v) = W @ v\ncell C(d, e) {\n    input x[d]\n    param U[e, e]\n"
                    "    output y = proj(U, x)\n}\n")
    r = rcc_cli("check", str(path))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"{path}:5:16: error: shape mismatch in @")
    assert lines[3] == f"{path}:1:19: note: in fn 'proj', here"


@pytest.mark.parametrize("args", [
    ("check", "does_not_exist.rnn"),
    ("check",),
    ("compile", "--plan", "nonsense", "x.rnn"),
    ("check", "--bogus", "x.rnn"),
    ("frobnicate", "x.rnn"),
    (),
])
def test_usage_errors_exit_2(args, tmp_path):
    (tmp_path / "x.rnn").write_text(BAD)
    r = rcc_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr


def test_bad_dims_flag_exits_2():
    r = rcc_cli("compile", stdlib("mingru.rnn"), "--dims", "d=abc")
    assert r.returncode == 2 and "--dims expects NAME=INT" in r.stderr


def test_unwritable_output_exits_2(tmp_path):
    """A file that cannot be read or written: the command cannot run as given (2), not a cell
    that cannot compile (1)."""
    r = rcc_cli("compile", stdlib("mingru.rnn"), "-o", str(tmp_path / "no" / "such" / "out.py"))
    assert r.returncode == 2
    assert "cannot write" in r.stderr and "Traceback" not in r.stderr


def test_non_utf8_file_exits_1(tmp_path):
    path = tmp_path / "bin.rnn"
    path.write_bytes(b"\xff\xfe cell")
    r = rcc_cli("check", str(path))
    assert r.returncode == 1
    assert r.stderr.startswith(f"{path}:1:1: error: cannot read") and "UTF-8" in r.stderr


def test_check_a_library_of_fns(tmp_path):
    path = tmp_path / "lib.rnn"
    path.write_text("fn f_not(a) = 1 - a\nfn f_and(a, b) = a * b\n")
    r = rcc_cli("check", str(path))
    assert r.returncode == 0 and "no cells; 2 fns" in r.stdout


def test_compiled_module_runs_in_a_fresh_interpreter_without_the_compiler(tmp_path):
    out = tmp_path / "mingru_gen.py"
    r = rcc_cli("compile", stdlib("mingru.rnn"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        spec = importlib.util.spec_from_file_location("mingru_gen", {str(out)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        m = mod.MinGRU(d_in=3, d=4).double()
        x = torch.randn(2, 5, 3, dtype=torch.float64)
        y, final = m(x)
        y.sum().backward()
        assert 'lark' not in sys.modules and 'sympy' not in sys.modules
        # the same recurrence by hand (no torch.testing here: it imports sympy)
        h = torch.zeros(2, 4, dtype=torch.float64)
        for t in range(5):
            z = torch.sigmoid(x[:, t] @ m.Wz.T + m.bz)
            h = (1 - z) * h + z * (x[:, t] @ m.Wh.T + m.bh)
            assert (y[:, t] - h).abs().max() < 1e-12
        assert (final["h"] - h).abs().max() < 1e-12
        print("ran ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "ran ok" in run.stdout


def test_compile_default_output_name(tmp_path):
    r = rcc_cli("compile", stdlib("mingru.rnn"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mingru.py").is_file()


def test_rcc_console_script_matches_python_m(tmp_path):
    """The installed `rcc` entry point, when present, behaves like `python -m rcc`."""
    exe = os.path.join(os.path.dirname(sys.executable), "rcc")
    if not os.path.exists(exe):
        pytest.skip("no rcc console script next to this interpreter")
    path = tmp_path / "bad.rnn"
    path.write_text(BAD)
    r = subprocess.run([exe, "check", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"{path}:3:20: error: unknown name 'z'" in r.stderr


def test_explain_shows_the_plan_auto_chooses_per_length_and_device():
    r = rcc_cli("explain", stdlib("gla.rnn"), "--device", "cuda", "--T", "64", "65536")
    assert r.returncode == 0, r.stderr
    assert "legal plans: sequential, scan, chunk" in r.stdout
    assert "plan 'auto' on cuda" in r.stdout
    assert "T=64:" in r.stdout and "T=65536:" in r.stdout and "chunk" in r.stdout


def test_version():
    import rcc

    r = rcc_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rcc {rcc.__version__}"


def test_dims_are_checked_and_a_free_dim_becomes_the_default(tmp_path):
    r = rcc_cli("compile", stdlib("lstm.rnn"), "--dims", "zz=3", "-o", str(tmp_path / "a.py"))
    assert r.returncode == 1 and "has no dim 'zz' (dims: d_in, d)" in r.stderr
    assert "Traceback" not in r.stderr
    r = rcc_cli("compile", stdlib("lstm.rnn"), "--dims", "d=0")
    assert r.returncode == 2 and "positive INT" in r.stderr
    r = rcc_cli("compile", stdlib("lstm.rnn"), "--dims", "d=8", "d_in=4", "-o", str(tmp_path / "lstm_cli.py"))
    assert r.returncode == 0, r.stderr
    check = subprocess.run([sys.executable, "-c", "import lstm_cli; print(lstm_cli.LSTM().dims)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=ROOT))
    assert "{'d_in': 4, 'd': 8}" in check.stdout, check.stderr
