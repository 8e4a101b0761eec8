"""`rcc precompile`: a cell's Triton kernels compiled ahead of a job, for a GPU that is not here
(--arch), each with its compile seconds, registers, spills and shared memory."""
import os
import subprocess
import sys

from conftest import stdlib


def _rcc(*args, cache=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache:
        env["TRITON_CACHE_DIR"] = str(cache)  # cold: every kernel is compiled
    return subprocess.run([sys.executable, "-m", "rcc", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_precompile_for_sm90_without_a_gpu(tmp_path):
    run = _rcc("precompile", stdlib("gru.rnn"), "--dims", "d_in=96", "d=96", "--dtype", "bfloat16",
               "--arch", "sm_90", cache=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [ln.split("|") for ln in run.stdout.splitlines() if ln.startswith("| GRU")]
    assert [r[1].strip() for r in rows] == ["GRU forward", "GRU forward, no gradients", "GRU backward"]
    for r in rows:
        seconds, regs, spilled, shared = float(r[2]), int(r[3]), int(r[4]), int(r[5])
        assert seconds > 0 and 0 < regs <= 255 and spilled == 0 and shared >= 0
    assert "sm_90, bfloat16, 16 rows" in run.stdout


def test_precompile_errors_are_clear(tmp_path):
    loop = tmp_path / "loop.rnn"  # plan auto reads the cell's form: a loop count needs its value
    loop.write_text("cell L(d, n) {\n    input x[d]\n    state h[d]\n    h_0 = h\n"
                    "    for j in 0..n {\n        h_0 = 0.5 * h_0\n    }\n    h' = h_0 + x\n"
                    "    output h'\n}\n")
    unbound = _rcc("precompile", str(loop), "--dims", "d=8", "--arch", "sm_90")
    assert unbound.returncode == 1 and "--dims n=N" in unbound.stderr, unbound.stderr
    assert "Traceback" not in unbound.stderr and "internal error" not in unbound.stderr
    no_gpu = _rcc("precompile", stdlib("gru.rnn"), "--dims", "d_in=8", "d=8")
    assert no_gpu.returncode == 2 and "--arch sm_90" in no_gpu.stderr, no_gpu.stderr
    missing = _rcc("precompile", stdlib("gru.rnn"), "--dims", "d=8", "--arch", "sm_90")
    assert missing.returncode == 1 and "d_in" in missing.stderr and "Traceback" not in missing.stderr
    arch = _rcc("precompile", stdlib("gru.rnn"), "--dims", "d_in=8", "d=8", "--arch", "hopper")
    assert arch.returncode == 2 and "sm_XY" in arch.stderr
    batch = _rcc("precompile", stdlib("gru.rnn"), "--dims", "d_in=8", "d=8", "--arch", "sm_90",
                 "--batch", "0")
    assert batch.returncode == 2 and "--batch" in batch.stderr


def test_precompile_plan_chunk(tmp_path):
    """Plan chunk's kernels (the library's, at the cell's key and value sizes): DeltaProduct's
    seven (forward and backward), RWKV-6's six and the stabilised mLSTM's eight (its max-plus
    scan's two first), none spilling."""
    run = _rcc("precompile", stdlib("deltaproduct.rnn"), "--dims", "K=64", "V=48", "--dtype", "bfloat16",
               "--plan", "chunk", "--arch", "sm_90", cache=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [ln.split("|") for ln in run.stdout.splitlines() if ln.startswith("| DeltaProduct chunk")]
    assert len(rows) == 7 and all(r[1].strip().endswith("K=64 V=48") for r in rows), run.stdout
    assert all(int(r[4]) == 0 and float(r[2]) > 0 for r in rows), run.stdout
    rwkv6 = _rcc("precompile", stdlib("rwkv6.rnn"), "--dims", "K=32", "V=32", "--plan", "chunk",
                 "--arch", "sm_90", cache=tmp_path)  # reads before the step: the strict scores
    assert rwkv6.returncode == 0, rwkv6.stderr[-3000:]
    rows = [ln.split("|") for ln in rwkv6.stdout.splitlines() if ln.startswith("| RWKV6 chunk")]
    assert len(rows) == 6 and all(int(r[4]) == 0 for r in rows), rwkv6.stdout
    mlstm = _rcc("precompile", stdlib("mlstm.rnn"), "--dims", "K=16", "V=16",
                 "--arch", "sm_90", cache=tmp_path)  # plan auto: chunk, the max-plus scan first
    assert mlstm.returncode == 0, mlstm.stderr[-3000:]
    assert "8 kernels of plan chunk for sm_90" in mlstm.stdout, mlstm.stdout
    rows = [ln.split("|") for ln in mlstm.stdout.splitlines() if ln.startswith("| MLSTM chunk")]
    assert [r[1].strip() for r in rows[:2]] == ["MLSTM chunk max-plus scan",
                                                "MLSTM chunk max-plus scan backward"]
    assert len(rows) == 8 and all(int(r[4]) == 0 for r in rows), mlstm.stdout


def test_precompile_plans_scan_and_newton(tmp_path):
    """Plan scan's linear scan (forward and backward) and plan newton's generated Jacobian kernel
    with its block scan, none spilling."""
    scan = _rcc("precompile", stdlib("hgrn.rnn"), "--dims", "d=64", "--plan", "scan", "--arch", "sm_90",
                cache=tmp_path / "scan")
    assert scan.returncode == 0, scan.stderr[-3000:]
    rows = [ln.split("|") for ln in scan.stdout.splitlines() if ln.startswith("| HGRN")]
    assert [r[1].strip() for r in rows] == ["HGRN linear scan", "HGRN linear scan backward"]
    newton = _rcc("precompile", stdlib("pararnn_lstm.rnn"), "--dims", "d_in=24", "d=40", "--plan",
                  "newton", "--arch", "sm_90", cache=tmp_path / "newton")
    assert newton.returncode == 0, newton.stderr[-3000:]
    rows = [ln.split("|") for ln in newton.stdout.splitlines() if ln.startswith("| ParaLSTM")]
    assert [r[1].strip() for r in rows] == ["ParaLSTM Jacobian", "ParaLSTM block scan k=2"]
    assert all(int(r[4]) == 0 for r in rows), newton.stdout
