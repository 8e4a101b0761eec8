"""Backend 'triton': what is particular to it (its equality with the torch reference on every
cell is in test_kernel_backends.py). On CPU its kernels run in Triton's interpreter."""
import subprocess
import sys

import pytest
import torch

import rcc
from conftest import STDLIB_DIMS, cell_inputs, run_with_grads, stdlib


@pytest.mark.parametrize("name,dims,plan", [
    ("lstm.rnn", {"d_in": 3, "d": 5}, "sequential"), ("gla.rnn", {"K": 4, "V": 3}, "sequential"),
    ("gla.rnn", {"K": 4, "V": 3}, "chunk"), ("deltanet.rnn", {"K": 4, "V": 3}, "chunk"),
    ("mlstm.rnn", {"K": 4, "V": 3}, "chunk"),
    ("mingru.rnn", {"d_in": 3, "d": 5}, "scan"), ("pararnn_gru.rnn", {"d_in": 3, "d": 5}, "newton")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(name, dims, plan, dtype):
    """bf16/fp16 inputs and params, float32 inside the kernels: as close to the float32
    reference as rounding the inputs and results to half precision allows."""
    ref = rcc.compile(stdlib(name), backend="torch", plan="sequential")(**dims)
    mod = rcc.compile(stdlib(name), backend="triton", plan=plan)(**dims).to(dtype)
    mod.load_state_dict(ref.state_dict())
    ref.load_state_dict(mod.float().state_dict())  # the same (rounded) params in float32
    mod = mod.to(dtype)
    xs, init = cell_inputs(ref, 2, 6, (2,), torch.float32)
    xs = [x.detach().to(dtype).float().requires_grad_() for x in xs]
    init = {k: v.detach().to(dtype).float().requires_grad_() for k, v in init.items()}
    want, want_grads = run_with_grads(ref, xs, init)
    half = [x.detach().to(dtype).requires_grad_() for x in xs]
    half_init = {k: v.detach().to(dtype).requires_grad_() for k, v in init.items()}
    got, got_grads = run_with_grads(mod, half, half_init)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 4e-3, "atol": 4e-3}
    for w, g in zip(want, got):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, **tol)
    for w, g in zip(want_grads[:len(xs)], got_grads[:len(xs)]):
        torch.testing.assert_close(g.float(), w, **tol)


def test_plan_auto_is_chunk_then_scan_then_the_fused_loop():
    assert "plan chunk" in rcc.generate(stdlib("gla.rnn"), backend="triton")
    assert "plan scan" in rcc.generate(stdlib("mingru.rnn"), backend="triton")
    assert "plan sequential" in rcc.generate(stdlib("lstm.rnn"), backend="triton")
    assert "plan chunk" in rcc.generate(stdlib("deltanet.rnn"), backend="triton")
    # the stabilised mLSTM: the max-plus scan's kernels, then the chunkwise form's
    assert "plan chunk" in rcc.generate(stdlib("mlstm.rnn"), backend="triton")
    # a scan would write the matrix state out for every step: the fused loop keeps it on chip
    assert "plan sequential" in rcc.generate(stdlib("mamba.rnn"), backend="triton")


def _run(code, env=None):
    import os
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=environ)


def test_cpu_tensors_without_the_interpreter_are_a_clear_error():
    code = "\n".join([
        "import torch, rcc",
        f"m = rcc.compile({stdlib('hgrn.rnn')!r}, backend='triton')(d=3)",
        "try:",
        "    m(torch.randn(2, 4, 3), torch.randn(2, 4, 3))",
        "except RuntimeError as e:",
        "    print(e)",
    ])
    run = _run(code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CUDA tensors" in run.stdout and "TRITON_INTERPRET=1" in run.stdout, run.stdout


def test_cell_names_cannot_shadow_triton():
    """A cell named like the module's imports still gets working kernels."""
    source = "cell triton(d) {\n input x[d]\n state h[d]\n h' = tanh(x + h)\n output y = h'\n}\n"
    m = rcc.compile(source, backend="triton")(d=3)
    y, final = m(torch.randn(2, 3, 3))
    assert y.shape == (2, 3, 3)


def test_gpu_benchmark_script_runs_in_the_interpreter():
    """benchmarks/gpu.py on tiny shapes (--smoke): its tables and checks run end to end."""
    import os
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "gpu.py")
    run = subprocess.run([sys.executable, script, "--smoke", "--only", "gla", "lstm"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| rcc gla" in run.stdout and "| rcc lstm" in run.stdout, run.stdout


# ---- the plans' Triton kernels against rcc.runtime's torch forms -----------------------------------
def _grads(fn, args, wrt, cotangents):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    return list(outs) + list(torch.autograd.grad(loss, wrt))


def _close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


F64 = torch.float64


@pytest.mark.parametrize("T,a_shape,b_shape", [
    (1, (1, 3, 4, 1), (1, 3, 4, 5)), (70, (70, 3, 4, 1), (70, 3, 4, 5)),  # 70: three blocks of 32
    (33, (1, 1, 4, 5), (33, 2, 4, 5)), (45, (), (45, 7)), (9, (9, 7), (9, 7))])
def test_linear_scan(T, a_shape, b_shape):
    from rcc.runtime import scan
    from rcc.runtime.triton import linear_scan
    a = torch.rand(a_shape, dtype=F64, requires_grad=True)
    b = torch.randn(b_shape, dtype=F64, requires_grad=True)
    s0 = torch.randn(b_shape[1:], dtype=F64, requires_grad=True)
    g = [torch.randn(b_shape, dtype=F64)]
    _close(_grads(linear_scan, (a, b, s0), (a, b, s0), g),
           _grads(scan.linear_scan, (a, b, s0), (a, b, s0), g))


@pytest.mark.parametrize("T,a_shape,b_shape", [
    (1, (1, 3, 4), (1, 3, 4)), (70, (70, 3, 4), (70, 3, 4)),  # 70: three blocks of 32
    (33, (1, 1, 4), (33, 2, 4)), (45, (), (45, 7)), (32, (32, 7), (32, 7))])
def test_maxplus_scan(T, a_shape, b_shape):
    from rcc.runtime import maxplus_scan
    from rcc.runtime import triton as rtt
    a = (-torch.rand(a_shape, dtype=F64)).requires_grad_()
    b = (3 * torch.randn(b_shape, dtype=F64)).requires_grad_()
    m0 = torch.randn(b_shape[2:], dtype=F64, requires_grad=True)  # broadcast over the batch
    g = [torch.randn(b_shape, dtype=F64)]
    _close(_grads(rtt.maxplus_scan, (a, b, m0), (a, b, m0), g),
           _grads(maxplus_scan, (a, b, m0), (a, b, m0), g))


def test_maxplus_scan_ties_split_the_gradient_as_torch_maximum():
    from rcc.runtime import triton as rtt
    a = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    b = torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0]], dtype=F64, requires_grad=True)
    m0 = torch.zeros(2, dtype=F64, requires_grad=True)
    want, m = [], m0
    for t in range(3):  # the sequential steps with torch.maximum
        m = torch.maximum(m + a[t], b[t])
        want.append(m)
    want = torch.stack(want)
    g = [torch.randn(3, 2, dtype=F64)]
    _close(_grads(rtt.maxplus_scan, (a, b, m0), (a, b, m0), g), _grads(lambda *x: want, (), (a, b, m0), g))


def test_maxplus_scan_in_bf16_takes_the_forwards_branches():
    """The backward finds each step's branch from m kept in float32: from m rounded to bf16,
    1-2% of near-ties flipped and gradients were off by up to 12 (found by a review)."""
    from rcc.runtime import triton as rtt
    torch.manual_seed(3)
    a = -0.02 * torch.rand(64, 256)
    b = 3 + 0.05 * torch.randn(64, 256)
    m0 = torch.full((256,), 3.0)
    g = torch.randn(64, 256)
    xs = [x.to(torch.bfloat16).requires_grad_() for x in (a, b, m0)]
    got = torch.autograd.grad((rtt.maxplus_scan(*xs).float() * g).sum(), xs)
    xs32 = [x.detach().float().requires_grad_() for x in xs]  # the same (rounded) inputs
    want = torch.autograd.grad((rtt.maxplus_scan(*xs32) * g).sum(), xs32)
    for w, x in zip(want, got):
        torch.testing.assert_close(x.float(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("T,A_lead,b_lead", [(1, (1, 3), (1, 3)), (70, (70, 3, 4), (70, 3, 4)),
                                             (33, (1, 1, 4), (33, 2, 4))])
def test_block_scan_and_adjoints(k, T, A_lead, b_lead):
    from rcc.runtime import scan
    from rcc.runtime import triton as rtt
    A = torch.rand(*A_lead, k, k, dtype=F64) * 0.5
    b = torch.randn(*b_lead, k, dtype=F64)
    s0 = torch.randn(*b_lead[1:], k, dtype=F64)
    torch.testing.assert_close(rtt.block_scan(A, b, s0), scan.block_scan(A, b, s0), rtol=1e-10, atol=1e-10)
    A_t = A.reshape((1,) * (b.dim() + 1 - A.dim()) + tuple(A.shape))
    torch.testing.assert_close(rtt.block_adjoint(A, b), scan.block_adjoint(A_t, b), rtol=1e-10, atol=1e-10)
    a = torch.rand(T, *b_lead[1:], 1, dtype=F64)
    torch.testing.assert_close(rtt.linear_adjoint(a, b), scan.linear_adjoint(a, b), rtol=1e-10, atol=1e-10)


def test_user_names_cannot_shadow_the_kernels_or_helpers():
    """A cell named like a prelude helper, with a param named like its kernel, still works."""
    source = ("cell rcc_tanh(d) {\n input x[d]\n param rcc_tanh_forward[d]\n state h[d]\n"
              " h' = tanh(x + rcc_tanh_forward * h)\n output y = h'\n}\n")
    ref = rcc.compile(source, backend="torch")(d=3).double()
    m = rcc.compile(source, backend="triton")(d=3).double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)


def test_constants_and_dims_as_whole_values():
    """A state updated to a dim, a constant output, a dim stacked with a state: the constants a
    non-pointwise op or a root reads get tiles of their own."""
    source = ("cell C(d) {\n input x[d]\n state h[d], m\n h' = tanh(x + h) * 0.1\n m' = d\n"
              " output z = stack(d * 1.0, m)\n output c = 2.5\n output y = h' + m\n}\n")
    ref = rcc.compile(source, backend="torch")(d=3).double()
    m = rcc.compile(source, backend="triton")(d=3).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    (want, got) = ref(x), m(x)
    for w, g in zip(want[0], got[0]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1]["m"], want[1]["m"])
    gw, = torch.autograd.grad(want[0][2].sum(), x)
    gg, = torch.autograd.grad(got[0][2].sum(), x)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-12)


# ---- what only a GPU compiler would catch ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STDLIB_DIMS))
def test_every_kernel_declares_every_constexpr_it_is_launched_with(name):
    """Triton rejects a launch passing a constexpr its kernel does not declare (the interpreter
    does not): every kernel of a module takes all of its meta's keys."""
    import inspect
    modules = [rcc.compile(stdlib(name), backend="triton", plan="sequential")]
    if "newton" in rcc.analyze(stdlib(name)).plans:
        modules.append(rcc.compile(stdlib(name), backend="triton", plan="newton"))
    for cls in modules:
        m = cls(**STDLIB_DIMS[name])
        module = sys.modules[type(m).__module__]
        kernels = [v for k, v in vars(module).items() if k.endswith(("_forward", "_backward", "_jacobian"))]
        assert kernels
        for kernel in kernels:
            fn = kernel
            while hasattr(fn, "fn"):  # under @triton.autotune and @triton.jit
                fn = fn.fn
            params = set(inspect.signature(fn).parameters)
            assert set(m._meta) <= params, (kernel, set(m._meta) - params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_compile_for_an_h100_offline(dtype):
    """Triton's compiler lowers kernels to an sm_90 cubin without a GPU (its wheel carries ptxas):
    a generated loop, the scans and the chunk kernels on their tl.dot paths (float32 in full
    precision, bfloat16 operands) compile for the GPU, not only in the interpreter. Run outside
    the interpreter, in benchmarks/gpu_compile.py."""
    import os
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "gpu_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, script, "--small", "--dtype", dtype, "--only", "hgrn", "gla",
                          "plans"], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [ln for ln in run.stdout.splitlines() if ln.startswith("| ") and "kernel" not in ln]
    assert len(rows) == 41 and all(int(r.split("|")[2]) > 0 for r in rows), run.stdout


def test_loop_kernels_do_not_spill_at_model_sizes():
    """Plan sequential's kernels (forward and backward), bf16, compiled for sm_90: no register
    spills (cuobjdump's STACK and LOCAL both 0). The cells tiled over units at d=1024, 16 rows
    (the same compiled kernel serves every d > 32); the matrix-state cells at K=V=128, their
    columns split over programs."""
    import os
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "gpu_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cells = ["lstm", "gru", "elman", "slstm", "pararnn_gru", "pararnn_lstm", "mingru", "minlstm",
             "hgrn", "rglru", "mlstm", "gla", "deltanet", "gated_deltanet", "kda", "rwkv7"]
    run = subprocess.run([sys.executable, script, "--dtype", "bfloat16", "--only", *cells],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [ln.split("|") for ln in run.stdout.splitlines() if "sequential" in ln]
    assert len(rows) == 2 * len(cells), run.stdout
    assert all(int(r[3]) == 0 for r in rows), run.stdout
