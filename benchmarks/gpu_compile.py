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
from rcc.runtime.triton.offline import (chunk_launches, compile_for, loop_kernels, maxplus_launches,  # noqa: E402
                                        resources)


def sequential_kernels(name, dims, dtype, batch=16, sms=132):
    """(label, jit, constexprs, options, wide) of a stdlib cell's generated loop kernels (with
    gradients), for `batch` rows on a GPU of `sms` multiprocessors."""
    cls = rcc.compile(os.path.join(REPO, "stdlib", name + ".rnn"), backend="triton", plan="sequential")
    kernels = loop_kernels(cls(**dims), dtype, batch, sms, f"{name} sequential")
    return [k for k in kernels if "no gradients" not in k[0]]


def plan_kernels(dtype, K=128, V=128):
    """The plans' library kernels at flash-linear-attention's head sizes."""
    from rcc.runtime.triton import scan
    acc = accumulator(dtype)
    block = dict(scan.CONFIGS[0].kwargs)
    scans = [(label, jit, constexprs, {}, ()) for label, jit, constexprs in [
        ("linear scan forward", scan._linear_scan_forward, dict(ACC=acc, BLOCK_T=scan.BLOCK_T, **block)),
        ("linear scan backward", scan._linear_scan_backward, dict(ACC=acc, BLOCK_T=scan.BLOCK_T, **block)),
        ("block scan k=2 forward", scan._block_kernel(2), dict(ACC=acc, BLOCK_T=scan.BLOCK_T, **block)),
    ]]
    return (scans + chunk_launches("linear_attention", dtype, K, V, label="chunk GLA")
            + chunk_launches("linear_attention", dtype, K, V, scalar_decay=True, label="chunk RetNet")
            + chunk_launches("delta_rule", dtype, K, V, label="chunk delta rule")
            + chunk_launches("delta_rule", dtype, K, V, n_h=2, label="chunk DeltaProduct n_h=2")
            + chunk_launches("dplr", dtype, K, V, label="chunk KDA")
            + maxplus_launches(dtype, "chunk mLSTM (its stabiliser first)"))


CELLS = {  # plan sequential at the sizes of benchmarks/gpu.py (the tiled kernels serve every d > 32)
    "lstm": {"d_in": 1024, "d": 1024}, "gru": {"d_in": 1024, "d": 1024}, "gla": {"K": 128, "V": 128},
    "deltanet": {"K": 128, "V": 128}, "hgrn": {"d": 2048}, "slstm": {"d_in": 1024, "d": 1024},
    "mingru": {"d_in": 1024, "d": 1024}, "elman": {"d_in": 1024, "d": 1024},
    "pararnn_gru": {"d_in": 1024, "d": 1024}, "pararnn_lstm": {"d_in": 1024, "d": 1024},
    "minlstm": {"d_in": 1024, "d": 1024}, "rglru": {"d": 1024}, "mlstm": {"K": 128, "V": 128},
    "gated_deltanet": {"K": 128, "V": 128}, "kda": {"K": 128, "V": 128}, "rwkv7": {"K": 128, "V": 128},
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
        for label, jit, constexprs, options, wide in kernels:
            start = time.perf_counter()
            k = compile_for(jit, constexprs, dtype, args.arch, wide=wide, **options)
            took = time.perf_counter() - start
            regs, spills, _ = resources(k)
            print(f"| {label:<44} | {regs:>4} | {spills:>7} | {k.metadata.shared:>8} |"
                  f" {k.metadata.num_warps:>5} | {took:>9.1f} |")


if __name__ == "__main__":
    main()
