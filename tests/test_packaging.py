"""A non-editable install works: the wheel holds every package of the source tree and its data
files, and rcc runs from it outside the source tree (issue 18: `pip install .` lacked
rcc.passes while CI tested only the editable install)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject.toml's package-dir)
SOURCES = {"rcc": "rcc", "backends": "rcc/backends", "grammar": "rcc/grammar", "stdlib": "rcc/stdlib"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy without build outputs: a stale build/ would hide a missing package
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".hypothesis", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(source)], check=True,
                   cwd=out, capture_output=True)
    (path,) = out.glob("rcc-*.whl")
    return path


def test_the_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in SOURCES.items():
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in (".py", ".lark", ".rnn") and "__pycache__" not in f.parts:
                rel = f.relative_to(ROOT / folder).as_posix()
                assert f"{package}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"


def test_rcc_runs_from_the_wheel_outside_the_tree(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # as where triton does not install (macOS): import fails\n"
        "import torch, rcc\n"
        f"assert rcc.__file__.startswith({str(site)!r}), rcc.__file__\n"
        "from rcc.cli import main\n"
        "from importlib.resources import files\n"
        "path = str(files('rcc.stdlib') / 'gla.rnn')\n"
        "assert main(['compile', path, '-o', 'gla_out.py']) in (0, None)\n"
        "m = rcc.compile(path, plan='chunk')(K=4, V=3)\n"
        "q, k, v = (torch.randn(2, 5, 4, requires_grad=True) for _ in range(3))\n"
        "o, _ = m(q, k, v[..., :3], -torch.rand(2, 5, 4))\n"
        "o.sum().backward()\n"
        "outside = [n for n, mod in sys.modules.items() if n.split('.')[0] == 'rcc' and\n"
        f"           not (getattr(mod, '__file__', None) or {str(site)!r}).startswith({str(site)!r})]\n"
        "assert not outside, outside  # all of rcc came from the wheel\n"
        "print('ok', tuple(o.shape))\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (2, 5, 3)" in done.stdout
    assert (tmp_path / "gla_out.py").exists()


def test_triton_is_an_extra(wheel):
    """triton (Linux wheels only) is required by the `triton` extra, not by rcc itself."""
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    assert any("torch" in r for r in requires)
    for r in requires:
        if "triton" in r:
            assert "extra ==" in r, r


NO_TRITON = ("import sys\n"
             "sys.modules['triton'] = None  # triton not installed\n")


def test_backend_triton_without_triton_names_the_extra(tmp_path):
    script = NO_TRITON + (
        "import rcc\n"
        f"path = {str(ROOT / 'stdlib' / 'lstm.rnn')!r}\n"
        "rcc.compile(path, backend='cpp')  # the other backends do not need it\n"
        "try:\n"
        "    rcc.compile(path, backend='triton')\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
        "from rcc.cli import main\n"
        "print('exit', main(['precompile', path, '--dims', 'd_in=4', 'd=8', '--arch', 'sm_90']))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: backend 'triton' needs the triton package" in done.stdout
    assert "pip install 'rcc[triton]'" in done.stdout
    assert "exit 2" in done.stdout
    assert "rcc: error: backend 'triton' needs the triton package" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_wheel_installs_in_a_fresh_venv(wheel, tmp_path):
    """pip install of the wheel into a new venv (torch and the other dependencies seen from this
    interpreter's site-packages: nothing is downloaded), then the rcc command and a training
    step from it, outside the source tree."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    done = subprocess.run([str(bin_dir / "rcc"), "compile", "--help"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    script = (
        "import torch, rcc\n"
        f"assert rcc.__file__.startswith({str(venv)!r}), rcc.__file__\n"
        "from importlib.resources import files\n"
        "m = rcc.compile(str(files('rcc.stdlib') / 'lstm.rnn'))(d_in=3, d=4)\n"
        "y, _ = m(torch.randn(2, 5, 3))\n"
        "y.sum().backward()\n"
        "print('ok', tuple(y.shape), m.weight_hh.grad is not None)\n")
    done = subprocess.run([str(bin_dir / "python"), "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (2, 5, 4) True" in done.stdout
    out = subprocess.run([str(bin_dir / "rcc"), "compile", str(ROOT / "stdlib" / "gru.rnn"), "-o",
                          str(tmp_path / "gru.py")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "gru.py").exists(), out.stderr
