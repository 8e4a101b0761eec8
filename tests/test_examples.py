"""The runnable example (examples/parity.py) and the benchmark script run end to end as a user
would start them: as subprocesses, from a directory other than the repository."""
import os
import re
import subprocess
import sys

from conftest import ROOT

PARITY = os.path.join(ROOT, "examples", "parity.py")
REFERENCE_BENCH = os.path.join(ROOT, "benchmarks", "reference.py")


def run_script(args, cwd):
    # conftest points RCC_CACHE_DIR at a per-session directory; the child inherits it.
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def losses(stdout):
    return [float(v) for v in re.findall(r"^step\s+\d+\s+loss (\S+)", stdout, re.MULTILINE)]


def final_accuracy(stdout):
    match = re.search(r"^final accuracy (\S+) on", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


def test_parity_default_cell_runs_and_prints_losses(tmp_path):
    proc = run_script([PARITY, "--steps", "12", "--log-every", "4", "--batch", "16",
                       "--hidden", "8"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cell LSTM from stdlib/lstm.rnn" in proc.stdout
    found = losses(proc.stdout)
    assert len(found) == 3  # steps 4, 8 and 12
    assert all(0.0 < v < 5.0 for v in found)  # cross-entropy of 2 classes starts near log 2
    assert 0.0 <= final_accuracy(proc.stdout) <= 1.0


def test_parity_other_cell_by_repo_relative_path(tmp_path):
    # a path relative to the repository works from any directory
    proc = run_script([PARITY, "--cell-file", "stdlib/mingru.rnn", "--steps", "3", "--log-every",
                       "1", "--batch", "4", "--hidden", "4", "--loss", "last"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cell MinGRU from stdlib/mingru.rnn" in proc.stdout
    assert len(losses(proc.stdout)) == 3


def test_parity_lstm_learns(tmp_path):
    # the defaults, a little shortened: an LSTM learns parity of 10..16 bits
    proc = run_script([PARITY, "--steps", "150", "--log-every", "10"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = losses(proc.stdout)
    assert found[0] > 0.5 and found[-1] < 0.05  # from chance (log 2 = 0.69) to solved
    assert final_accuracy(proc.stdout) > 0.95


def test_parity_missing_cell_file_is_a_clear_error(tmp_path):
    proc = run_script([PARITY, "--cell-file", "stdlib/no_such_cell.rnn"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "cell file 'stdlib/no_such_cell.rnn' not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reference_benchmark_runs_small(tmp_path):
    proc = run_script([REFERENCE_BENCH, "--B", "2", "--T", "5", "--d", "8", "--d-in", "3",
                       "--repeats", "1", "--warmup", "0", "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "machine:" in proc.stdout
    for name in ("torch.nn.LSTM", "LSTMCell loop", "rcc torch reference"):
        assert re.search(rf"^  {re.escape(name)}\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+[\d.]+x$", proc.stdout,
                         re.MULTILINE), proc.stdout
    diffs = [float(v) for v in re.findall(r"max \|diff\| y (\S+)", proc.stdout)]
    assert len(diffs) == 2 and all(v < 1e-5 for v in diffs)
