"""Backend triton's kernels compiled for a GPU without one: Triton's compiler runs offline (its
wheel carries ptxas), so every kernel can be lowered to a cubin for an H100 (sm_90) here, and
its registers, spills and shared memory read off. That proves the kernels compile for the GPU (the
interpreter accepts code the compiler would reject) and shows, before any timing, where a kernel
will spill registers to local memory.

    python benchmarks/gpu_compile.py                    # every table: stdlib cells at the issue's sizes
    python benchmarks/gpu_compile.py --only lstm gla --arch 90
    python benchmarks/gpu_compile.py --small --dtype bfloat16     # a quick check (the tests run it)

Columns: registers per thread, bytes spilled per thread (STACK + LOCAL: spilled registers and
arrays), shared memory, warps, seconds to compile.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rcc  # noqa: E402
from rcc.runtime.triton.common import accumulator  # noqa: E402

# the unit kernels' buffers kept in the accumulator's precision (float32 for half types)
ACC_BUFFERS = ("p_hist", "p_z", "p_gz", "p_ladj", "p_dw")
WIDE = ("h_ptr", "dq_ptr", "dk_ptr", "dg_ptr", "ds0_ptr", "dbeta_ptr", "dsT_ptr", "lam_ptr", "da_ptr")


def compile_offline(jit, constexprs: dict, dtype=torch.float32, arch=90, num_warps=4, num_stages=3):
    """`jit` (a @triton.jit function, or an autotuned one) compiled for sm_`arch`: pointers of
    `dtype` (the float32 work buffers of the chunk kernels stay float32), every other argument
    an i32, `constexprs` given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit if hasattr(jit, "params") else jit.fn  # under @triton.autotune
    elem = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
            torch.float16: "fp16"}[dtype]
    signature, attrs = {}, {}
    for k, p in enumerate(fn.params):
        # what Triton's launcher assumes of the arguments it specializes: 16-byte aligned tensors,
        # integers (not marked do_not_specialize) divisible by 16, as at the sizes benchmarked
        if not p.is_constexpr and not p.do_not_specialize and p.name not in ("finish", "p_sync"):
            attrs[(k,)] = [["tt.divisibility", 16]]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name == "p_sync":  # the unit kernels' barrier counters
            signature[p.name] = "*i32"
        elif p.name.startswith("p_") or p.name.endswith("_ptr"):
            wide = p.name in WIDE or p.name.startswith(ACC_BUFFERS) or p.name.startswith("p_dx")
            signature[p.name] = f"*{'fp64' if elem == 'fp64' else 'fp32'}" if wide else f"*{elem}"
        elif p.name == "finish":
            signature[p.name] = "i1"
        else:
            signature[p.name] = "i32"
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sequential_kernels(name, dims, dtype, batch=16, sms=132):
    """(label, jit, constexprs, options) of a stdlib cell's generated loop kernels, for `batch`
    rows on a GPU of `sms` multiprocessors (an H100/H200 has 132)."""
    from rcc.runtime.triton.units import blocks, dot_type
    cls = rcc.compile(os.path.join(REPO, "stdlib", name + ".rnn"), backend="triton", plan="sequential")
    m = cls(**dims)
    module = sys.modules[type(m).__module__]
    kernel = next(k for k in dir(module) if k.endswith("_forward"))[:-len("_forward")]
    meta, options = dict(m._meta, ACC=accumulator(dtype)), {}
    if hasattr(module, kernel + "_units"):  # tiled over units: D is a runtime integer
        tiles = blocks(batch, meta.pop("D"), sms)
        options = {k: tiles[k] for k in ("num_warps", "num_stages")}
        meta.update({k: tiles[k] for k in ("BB", "HB", "SYNC")}, DOT=dot_type(dtype))
        return [(f"{name} sequential forward", getattr(module, kernel + "_forward"),
                 dict(meta, SAVE=True, BK=tiles["BK"]), options),
                (f"{name} sequential backward", getattr(module, kernel + "_backward"),
                 dict(meta, BK=tiles["BK_BACK"]), options)]
    return [(f"{name} sequential forward", getattr(module, kernel + "_forward"), dict(meta, SAVE=True), options),
            (f"{name} sequential backward", getattr(module, kernel + "_backward"), meta, options)]


def plan_kernels(dtype, K=128, V=128):
    """The plans' library kernels at flash-linear-attention's head sizes."""
    from rcc.runtime.triton import chunk, scan
    acc = accumulator(dtype)
    block = dict(scan.CONFIGS[0].kwargs)
    BV = min(V, 64)
    gla = dict(ACC=acc, MODE=chunk.dot_mode(dtype, 16, K, BV), C=16, PK=K, BV=BV)
    delta = dict(ACC=acc, MODE=chunk.dot_mode(dtype, 16, K, BV), C=16, NH=1, PL=16, PK=K, BV=BV)
    return [(label, jit, constexprs, {}) for label, jit, constexprs in [
        ("linear scan forward", scan._linear_scan_forward, dict(ACC=acc, BLOCK_T=scan.BLOCK_T, **block)),
        ("linear scan backward", scan._linear_scan_backward, dict(ACC=acc, BLOCK_T=scan.BLOCK_T, **block)),
        ("block scan k=2 forward", scan._block_kernel(2), dict(ACC=acc, BLOCK_T=scan.BLOCK_T, **block)),
        (f"chunk GLA forward K=V={K}", chunk._gla_forward, dict(gla, SAVE=True)),
        (f"chunk GLA backward K=V={K}", chunk._gla_backward, gla),
        (f"chunk delta rule forward K=V={K}", chunk._delta_forward, dict(delta, SAVE=True, HAS_GATE=True)),
        (f"chunk delta rule backward K=V={K}", chunk._delta_backward, dict(delta, HAS_GATE=True)),
    ]]


CELLS = {  # plan sequential at the sizes of benchmarks/gpu.py (the tiled kernels serve every d > 32)
    "lstm": {"d_in": 1024, "d": 1024}, "gru": {"d_in": 1024, "d": 1024}, "gla": {"K": 128, "V": 128},
    "deltanet": {"K": 128, "V": 128}, "hgrn": {"d": 2048}, "slstm": {"d_in": 1024, "d": 1024},
    "mingru": {"d_in": 1024, "d": 1024}, "elman": {"d_in": 1024, "d": 1024},
    "pararnn_gru": {"d_in": 1024, "d": 1024}, "pararnn_lstm": {"d_in": 1024, "d": 1024},
    "minlstm": {"d_in": 1024, "d": 1024}, "rglru": {"d": 1024},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=list(CELLS) + ["plans"])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--small", action="store_true", help="small sizes (K=V=16, d=16): a quick check")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("benchmarks/gpu_compile.py compiles for a GPU: unset TRITON_INTERPRET")
    dtype = getattr(torch, args.dtype)
    import triton
    print(f"Triton {triton.__version__}, compiled offline for sm_{args.arch}, {dtype} pointers")
    print(f"| {'kernel':<44} | regs | spill B | shared B | warps | compile s |")
    print(f"|{'-' * 46}|-----:|--------:|---------:|------:|----------:|")
    for name in args.only:
        if name == "plans":
            kernels = plan_kernels(dtype, *((16, 16) if args.small else ()))
        else:
            dims = {k: 16 for k in CELLS[name]} if args.small else CELLS[name]
            kernels = sequential_kernels(name, dims, dtype)
        for label, jit, constexprs, options in kernels:
            start = time.perf_counter()
            k = compile_offline(jit, constexprs, dtype, args.arch, **options)
            took = time.perf_counter() - start
            regs, spills = _resources(k)
            print(f"| {label:<44} | {regs:>4} | {spills:>7} | {k.metadata.shared:>8} |"
                  f" {k.metadata.num_warps:>5} | {took:>9.1f} |")


def _resources(k):
    """Registers per thread and spilled bytes per thread, from cuobjdump's report of the cubin
    (both tools come with Triton's wheel). Triton's cubins report spills as STACK (the stack
    frame local memory holds), not LOCAL: both are counted."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spilled = sum(int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", out))
    return (int(regs.group(1)) if regs else -1), spilled


if __name__ == "__main__":
    main()
