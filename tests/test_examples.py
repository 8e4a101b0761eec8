"""The runnable examples (examples/*.py) and the benchmark script run end to end as a user would
start them: as subprocesses, from a directory other than the repository."""
import math
import os
import re
import subprocess
import sys

from conftest import ROOT

PARITY = os.path.join(ROOT, "examples", "parity.py")
LANGUAGE_MODEL = os.path.join(ROOT, "examples", "language_model.py")
PLSTM_IMAGES = os.path.join(ROOT, "examples", "plstm_images.py")
NEWTON_LONG = os.path.join(ROOT, "examples", "newton_long_sequence.py")
LSRL_PROGRAMS = os.path.join(ROOT, "examples", "lsrl_programs.py")
REFERENCE_BENCH = os.path.join(ROOT, "benchmarks", "reference.py")


def run_script(args, cwd, threads=None):
    # conftest points RCC_CACHE_DIR at a per-session directory; the child inherits it.
    env = dict(os.environ)
    if threads is not None:
        # torch's intra-op threads: the small examples gain nothing from several, and on a machine
        # whose cores are busy with other tests they wait for each other (5x slower on 2 cores)
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


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


def printed_float(pattern, stdout):
    match = re.search(pattern, stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


LM_TINY = ["--steps", "30", "--log-every", "10", "--layers", "1", "--d-model", "32", "--heads", "2",
           "--head-dim", "8", "--batch", "8", "--length", "32", "--sample-length", "20"]


def test_language_model_loss_falls_and_decoding_carries_the_state(tmp_path):
    proc = run_script([LANGUAGE_MODEL, *LM_TINY], cwd=tmp_path, threads=1)
    assert proc.returncode == 0, proc.stderr
    assert "cell GLA from stdlib/gla.rnn" in proc.stdout
    found = losses(proc.stdout)
    assert len(found) == 3 and all(math.isfinite(v) for v in found)
    assert found[0] < 4.0  # cross-entropy over 32 characters starts near log 32 = 3.47
    assert found[-1] < found[0] - 0.2, found
    # one call over 48 characters and 48 calls of one character, carrying the GLA state, agree
    assert printed_float(r"max \|diff\| of the logits (\S+)$", proc.stdout) < 1e-4
    # the prompt and 20 sampled characters (which may include newlines), then print's newline
    sample = proc.stdout.split("sample (temperature 0.7):\n", 1)[1]
    assert sample.startswith("The keeper ") and len(sample) == len("The keeper ") + 20 + 1, sample


def test_language_model_plans_compute_the_same_losses(tmp_path):
    # the GLA layer under plan sequential (the loop) and chunk (the chunkwise form) trains the same
    found = {}
    for plan in ("sequential", "chunk"):
        proc = run_script([LANGUAGE_MODEL, *LM_TINY, "--steps", "10", "--log-every", "5",
                           "--sample-length", "1", "--plan", plan], cwd=tmp_path, threads=1)
        assert proc.returncode == 0, proc.stderr
        found[plan] = losses(proc.stdout)
    assert len(found["chunk"]) == 2
    assert all(abs(a - b) < 1e-3 for a, b in zip(found["sequential"], found["chunk"])), found


def test_plstm_images_runs_small_with_either_plan(tmp_path):
    for plan in ("sequential", "chunk"):
        proc = run_script([PLSTM_IMAGES, "--steps", "3", "--log-every", "1", "--batch", "8",
                           "--size", "6", "--eval-batches", "1", "--plan", plan], cwd=tmp_path, threads=1)
        assert proc.returncode == 0, proc.stderr
        assert "cell PLSTM2DP from stdlib/plstm.rnn" in proc.stdout
        found = losses(proc.stdout)
        assert len(found) == 3 and all(0.0 < v < 5.0 for v in found)  # 4 classes: log 4 = 1.39
        assert 0.0 <= final_accuracy(proc.stdout) <= 1.0


def test_plstm_images_learns_above_chance(tmp_path):
    proc = run_script([PLSTM_IMAGES, "--steps", "40", "--log-every", "20", "--batch", "32",
                       "--eval-batches", "2"], cwd=tmp_path, threads=1)
    assert proc.returncode == 0, proc.stderr
    assert final_accuracy(proc.stdout) > 0.5  # chance is 0.25; about 0.77 after these 40 steps


NEWTON_SMALL = ["--T", "1024", "--batch", "2", "--d", "16", "--d-in", "4", "--repeats", "1"]


def test_newton_long_sequence_matches_sequential_float32(tmp_path):
    proc = run_script([NEWTON_LONG, *NEWTON_SMALL, "--train-steps", "4"], cwd=tmp_path, threads=1)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr  # converged: no sequential fallback
    assert re.search(r"^newton: [1-9]\d* iterations, .* converged True, fallback to the loop False$",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert printed_float(r"max \|diff\| outputs (\S+)", proc.stdout) < 1e-4
    assert printed_float(r"final state (\S+)$", proc.stdout) < 1e-4
    assert printed_float(r"^max relative \|diff\| gradients (\S+)$", proc.stdout) < 1e-3
    assert re.search(r"^forward \+ backward, best of 1: sequential [\d.]+s, newton [\d.]+s",
                     proc.stdout, re.MULTILINE), proc.stdout
    found = losses(proc.stdout)  # training with plan newton
    assert len(found) == 4 and all(math.isfinite(v) for v in found) and found[-1] < found[0]


def test_newton_long_sequence_matches_sequential_float64(tmp_path):
    proc = run_script([NEWTON_LONG, *NEWTON_SMALL, "--train-steps", "0", "--dtype", "float64"],
                      cwd=tmp_path, threads=1)
    assert proc.returncode == 0, proc.stderr
    assert printed_float(r"max \|diff\| outputs (\S+)", proc.stdout) < 1e-10
    assert printed_float(r"^max relative \|diff\| gradients (\S+)$", proc.stdout) < 1e-10
    assert losses(proc.stdout) == []


def test_lsrl_programs_compile_to_every_target_they_have_a_construction_on(tmp_path):
    proc = run_script([LSRL_PROGRAMS, "--batch", "4", "--lengths", "1", "9"], tmp_path, threads=1)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    built = [r for r in rows if "no" not in r]
    refused = [r for r in rows if "no" in r]
    assert len(built) == 19 and len(refused) == 6
    exact = [r for r in built if r[1] != "hawk"]  # hawk's counters are approximate
    assert all(float(r[4]) == 0.0 for r in exact)  # float64: every stack equals its program
    # float32: exact but for f_ifelse's large constant (the Relu programs)
    assert all(float(r[5]) == 0.0 for r in exact if not r[0].endswith("Relu"))
    assert all(float(r[4]) < 1e-7 for r in built if r[1] == "hawk" and r[0].endswith("Mul"))
    assert {r[1] for r in refused if r[0] == "counting"} == {"hawk", "mamba"}
