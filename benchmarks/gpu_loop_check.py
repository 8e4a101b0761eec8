"""Plan sequential's tiled kernels on a GPU, against the torch reference: every stdlib cell whose
step works unit by unit, at hidden sizes that make several programs meet at the per-step
barrier (which Triton's interpreter, running programs one after another, cannot exercise), in
each launch mode. Exits non-zero on a mismatch.

    python benchmarks/gpu_loop_check.py                 # on cuda:0
    python benchmarks/gpu_loop_check.py --first-call lstm --dims d_in=1024 d=1024
        # the seconds a fresh process takes to its first forward + backward (bf16, B=16, T=1024)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ["TRITON_INTERPRET"] = "0"  # tests/conftest.py (its input makers) asks for the interpreter
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import rcc  # noqa: E402

CELLS = ["lstm", "gru", "elman", "slstm", "pararnn_gru", "pararnn_lstm", "mingru", "minlstm",
         "hgrn", "rglru"]


def dims_for(name, d):
    return {"d": d} if name in ("hgrn", "rglru") else {"d_in": 7, "d": d}


def run_with_grads(m, xs, init):
    """Outputs, final states and the gradients of a random projection of them."""
    out, final = m(*xs, initial_state=init)
    tensors = list(out if isinstance(out, tuple) else (out,)) + [final[s] for s in m.STATES]
    gen = torch.Generator().manual_seed(2)
    loss = sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in tensors)
    wrt = xs + list(init.values()) + list(m.parameters())
    return tensors, torch.autograd.grad(loss, wrt, allow_unused=True)


def _worst(got, want):
    worst = 0.0
    for w, g in zip(want, got):
        if w is not None and w.numel():
            worst = max(worst, ((g.double() - w.double()).abs().max() / w.abs().max().clamp_min(1)).item())
    return worst


def compare(name, d, B, T, dtype, mode=None):
    """(the kernels' error, torch's own error in `dtype`): the largest difference of outputs,
    final states and gradients from the float64 torch reference, relative to each tensor's
    largest entry. sLSTM's exponential gates make a float32 run at d=1000 differ from float64 by
    1e-3 to 0.5 in torch itself (by the random init), hence the comparison with torch's own."""
    from conftest import cell_inputs

    import rcc.runtime.triton.units as units
    torch.manual_seed(0)
    path = os.path.join(REPO, "stdlib", name + ".rnn")
    ref = rcc.compile(path, backend="torch", plan="sequential")(**dims_for(name, d)).double()
    xs, init = cell_inputs(ref, B, T, (), torch.float64)
    ref.cuda()
    want = run_with_grads(ref, [x.detach().cuda().requires_grad_() for x in xs],
                          {k: v.detach().cuda().requires_grad_() for k, v in init.items()})
    results = []
    for backend in ("triton", "torch"):
        mod = rcc.compile(path, backend=backend, plan="sequential")(**dims_for(name, d)).to("cuda", dtype)
        mod.load_state_dict(ref.state_dict())
        leaves = [x.detach().to("cuda", dtype).requires_grad_() for x in xs]
        starts = {k: v.detach().to("cuda", dtype).requires_grad_() for k, v in init.items()}
        original = units.blocks
        if mode == "stepwise":
            units.blocks = lambda N, D, sms, matrices=1: dict(original(N, D, None, matrices), SYNC=False,
                                                              STEPWISE=D > 32)
        try:
            got = run_with_grads(mod, leaves, starts)
        finally:
            units.blocks = original
        results.append(_worst(list(got[0]) + list(got[1]), list(want[0]) + list(want[1])))
    return tuple(results)


def first_call(name, dims, B=16, T=1024):
    """Seconds to build the module, then to its first forward and backward (the kernels'
    compile or load from Triton's cache), after CUDA and cuBLAS have started."""
    a = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (a @ a).sum().backward()  # CUDA's and cuBLAS's own start is not the cell's
    torch.cuda.synchronize()
    start = time.perf_counter()
    m = rcc.compile(os.path.join(REPO, "stdlib", name + ".rnn"), backend="triton",
                    plan="sequential")(**dims).to("cuda", torch.bfloat16)
    built = time.perf_counter()
    x = torch.randn(B, T, m.shapes[m.INPUTS[0]][0], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = m(x)[0]
    torch.cuda.synchronize()
    forward = time.perf_counter()
    y.float().sum().backward()
    torch.cuda.synchronize()
    end = time.perf_counter()
    print(f"{name} {dims}: module {built - start:.2f} s, first forward {forward - built:.2f} s, first "
          f"backward {end - forward:.2f} s, total {end - start:.2f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--first-call")
    p.add_argument("--dims", nargs="*", default=[])
    p.add_argument("--cells", nargs="*", default=CELLS)
    args = p.parse_args()
    if args.first_call:
        first_call(args.first_call, {k: int(v) for k, v in (x.split("=") for x in args.dims)})
        return
    import triton
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)
    bad = []
    for name in args.cells:
        for d, B, T, dtype, mode in [(80, 19, 37, torch.float32, None), (1000, 21, 9, torch.float32, None),
                                     (80, 19, 11, torch.float32, "stepwise"), (48, 3, 5, torch.float64, None),
                                     (1000, 21, 9, torch.float64, None)]:
            err, torch_err = compare(name, d, B, T, dtype, mode)
            ok = err <= max(1e-4 if dtype == torch.float32 else 1e-10, 10 * torch_err)
            print(f"{name:14} d={d:<5} B={B:<3} T={T:<3} {str(dtype)[6:]:8} {mode or 'default':9} "
                  f"error {err:.2e} (torch's own {torch_err:.2e}) {'ok' if ok else 'MISMATCH'}", flush=True)
            if not ok:
                bad.append(name)
    if bad:
        sys.exit(f"mismatch: {bad}")


if __name__ == "__main__":
    main()
