"""The cache runs only what rcc wrote for a key (issue 21, S2/S3): a planted or corrupt generated
module or kernel is detected and rebuilt, and a directory others may write to is refused."""
import os
import subprocess
import sys

from conftest import ROOT, stdlib

SCRIPT = """
import os, sys, torch, rcc
torch.manual_seed(0)
m = rcc.compile({path!r}, backend={backend!r})(d_in=3, d=4)
y, _ = m(torch.ones(1, 2, 3))
print("value", float(y.sum()))
print("pwned" if os.environ.get("RCC_PLANTED") else "clean")
"""


def _run(cache, backend="torch"):
    env = dict(os.environ, RCC_CACHE_DIR=str(cache), PYTHONPATH=ROOT)
    env.pop("RCC_PLANTED", None)
    return subprocess.run([sys.executable, "-c", SCRIPT.format(path=stdlib("lstm.rnn"),
                                                              backend=backend)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_planted_module_is_replaced_not_run(tmp_path):
    cache = tmp_path / "cache"
    first = _run(cache)
    assert first.returncode == 0, first.stderr
    planted = sorted(cache.glob("rcc_*.py"))
    assert planted
    for p in planted:  # a local attacker's code where rcc's was, and a truncated file
        p.write_text('import os\nos.environ["RCC_PLANTED"] = "1"\n')
    second = _run(cache)
    assert second.returncode == 0, second.stderr
    assert "clean" in second.stdout and first.stdout == second.stdout
    assert all("RCC_PLANTED" not in p.read_text() for p in planted)  # rewritten


def test_a_corrupt_or_planted_kernel_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    first = _run(cache, "cpp")
    assert first.returncode == 0, first.stderr
    kernels = sorted((cache / "cpp").glob("rcc_*.so"))
    assert kernels and all(os.path.exists(str(k) + ".sha256") for k in kernels)
    kernels[0].write_bytes(kernels[0].read_bytes()[:100])  # truncated
    second = _run(cache, "cpp")
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout


def test_a_directory_others_may_write_is_refused(tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)
    done = _run(cache)
    assert done.returncode != 0
    assert "writable by others" in done.stderr and "chmod go-w" in done.stderr


def test_a_new_cache_directory_is_private(tmp_path):
    cache = tmp_path / "fresh"
    assert _run(cache).returncode == 0
    assert (os.stat(cache).st_mode & 0o777) == 0o700
