"""`rcc precompile FILE.rnn --dims ... [--dtype] [--plan P] [--arch sm_90] [--batch N]`: every
Triton kernel a forward (with and without gradients) and a backward of the cell will launch in
plan P (auto, the default: the plan rcc.compile(backend='triton') picks; or sequential, chunk,
scan or newton), compiled ahead of a job, each in its own process, with its compile seconds,
registers, spilled bytes and shared memory.

With --arch, no GPU is needed: the kernels are lowered for that architecture here, a check of
compile time, registers and spills (on an H200 a launch did not find these cubins: its
specialization of the arguments differs, BENCHMARKS.md). Without it, on a GPU, the kernels are
compiled for it and the cell then runs once on zeros ([batch, 2 steps]), which leaves exactly the
kernels its launches use in Triton's cache.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

SMS = {90: 132, 100: 148, 89: 128, 80: 108}  # multiprocessors of the common GPUs of an arch


def parse_arch(text) -> int:
    digits = str(text).lower().removeprefix("sm_").removeprefix("sm")
    if not digits.isdigit():
        raise ValueError(f"--arch expects sm_XY (as sm_90), got {text!r}")
    return int(digits)


def _module(path, cell, dims, plan):
    from .api import compile as compile_cell
    cls = compile_cell(path, cell=cell, backend="triton", plan=plan, dims=dims)
    return cls(**dims)


def _kernels(path, cell, dims, plan, dtype, batch, sms):
    import torch

    from .runtime.triton.offline import chunk_kernels, loop_kernels, scan_kernels
    m = _module(path, cell, dims, plan)
    if plan == "chunk":
        return chunk_kernels(m, getattr(torch, dtype))
    if plan in ("scan", "newton"):
        return scan_kernels(m, getattr(torch, dtype))
    return loop_kernels(m, getattr(torch, dtype), batch, sms)


def _compile_one(job):
    """One kernel, in a worker process: (label, seconds, registers, spilled, shared)."""
    import torch

    from .runtime.triton.offline import compile_for, resources
    path, cell, dims, plan, dtype, batch, sms, arch, index = job
    label, jit, constexprs, options, wide = _kernels(path, cell, dims, plan, dtype, batch, sms)[index]
    start = time.perf_counter()
    kernel = compile_for(jit, constexprs, getattr(torch, dtype), arch, wide=wide, **options)
    return (label, time.perf_counter() - start, *resources(kernel))


def resolved_plan(path, cell, dims, plan) -> str:
    """The plan whose kernels a module of backend triton launches: plan 'auto' is the one
    rcc.compile(backend='triton') picks for the cell."""
    if plan != "auto":
        return plan
    from .api import _triton_plan, build_ir, needs_value
    from .elaborate import NeedStatic
    try:
        cell_ir = build_ir(path, cell, dims)[0]
    except NeedStatic as need:
        raise needs_value(need, "to compile its kernels: pass") from None
    if cell_ir.topology != "seq":  # the backend says what it runs over graphs and grids
        return "sequential"
    return _triton_plan(cell_ir, plan)[0]


def precompile(path, cell=None, dims=None, dtype="bfloat16", plan="auto", arch=None,
               batch=16, out=print) -> int:
    """Compile, print a row per kernel; returns the number of kernels that spill."""
    import multiprocessing

    import torch
    dims = dict(dims or {})
    plan = resolved_plan(path, cell, dims, plan)
    gpu = arch is None
    if gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("rcc precompile without --arch compiles for this machine's GPU, and "
                               "there is none: name the target, as --arch sm_90")
        major, minor = torch.cuda.get_device_capability()
        arch, sms = major * 10 + minor, torch.cuda.get_device_properties(0).multi_processor_count
    else:
        arch = parse_arch(arch)
        sms = SMS.get(arch)
    kernels = _kernels(path, cell, dims, plan, dtype, batch, sms)
    jobs = [(path, cell, dims, plan, dtype, batch, sms, arch, k) for k in range(len(kernels))]
    start = time.perf_counter()
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(_compile_one, jobs))
    out(f"{len(rows)} kernels of plan {plan} for sm_{arch}, {dtype}, {batch} rows, dims "
        f"{' '.join(f'{k}={v}' for k, v in dims.items()) or '-'} ({workers} processes, "
        f"{time.perf_counter() - start:.1f} s):")
    width = max([44] + [len(r[0]) for r in rows])
    out(f"| {'kernel':<{width}} | compile s | regs | spilled B | shared B |")
    out(f"|{'-' * (width + 2)}|----------:|-----:|----------:|---------:|")
    for label, seconds, regs, spilled, shared in rows:
        out(f"| {label:<{width}} | {seconds:>9.1f} | {regs:>4} | {spilled:>9} | {shared:>8} |")
    if gpu:
        _run_once(path, cell, dims, plan, dtype, batch, out)
    return sum(1 for r in rows if r[3] > 0)


def _run_once(path, cell, dims, plan, dtype, batch, out):
    """The cell's forward without and with gradients, then its backward, on zeros: what its
    launches compile, in Triton's cache."""
    import torch
    m = _module(path, cell, dims, plan).to("cuda", getattr(torch, dtype))
    start = time.perf_counter()
    xs = [torch.zeros(batch, 2, *m.shapes[n], device="cuda", dtype=getattr(torch, dtype),
                      requires_grad=True) for n in m.INPUTS]
    with torch.no_grad():
        m(*xs)
    out_, final = m(*xs)
    tensors = list(out_ if isinstance(out_, tuple) else (out_,)) + list(final.values())
    torch.autograd.backward([t.float().sum() for t in tensors])
    torch.cuda.synchronize()
    out(f"ran once on {torch.cuda.get_device_name(0)} ({time.perf_counter() - start:.1f} s): the "
        "kernels its launches use are in Triton's cache")
