"""Compiling a module's Triton kernels without running them: for a GPU that is not here (Triton's
compiler runs offline: its wheel carries ptxas, so a kernel lowers to an sm_90 cubin on any
machine), or ahead of a job (`rcc precompile`), with each kernel's compile time, registers,
spilled bytes and shared memory read off the cubin.

What a launch specializes is mirrored: pointers 16-byte aligned, integers not marked
do_not_specialize divisible by 16 (as the benchmarked sizes are), the launch's warps and stages.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch

from .common import accumulator

# buffers the kernels keep in the accumulator's precision (float32 for half types)
ACC_BUFFERS = ("p_hist", "p_z", "p_gz", "p_ladj")
WIDE = ("h_ptr", "dq_ptr", "dk_ptr", "dg_ptr", "ds0_ptr", "dbeta_ptr", "dsT_ptr", "lam_ptr", "da_ptr")


def compile_for(jit, constexprs: dict, dtype=torch.float32, arch=90, num_warps=4, num_stages=3,
                wide=()):
    """`jit` (a @triton.jit function, or an autotuned one) compiled for sm_`arch`: pointers of
    `dtype` but the float32 work buffers (`wide`, ACC_BUFFERS, WIDE), every other argument an
    i32, `constexprs` given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit if hasattr(jit, "params") else jit.fn  # under @triton.autotune
    elem = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
            torch.float16: "fp16"}[dtype]
    signature, attrs = {}, {}
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default},
                  **constexprs}  # a launch's defaults
    for k, p in enumerate(fn.params):
        if not p.is_constexpr and not p.do_not_specialize and p.name != "finish":
            attrs[(k,)] = [["tt.divisibility", 16]]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name == "p_sync":  # the tiled loop's barrier counters
            signature[p.name] = "*i32"
        elif p.name.startswith("p_") or p.name.endswith("_ptr"):
            is_wide = p.name in WIDE or p.name.startswith(ACC_BUFFERS) or p.name in wide
            signature[p.name] = f"*{'fp64' if elem == 'fp64' else 'fp32'}" if is_wide else f"*{elem}"
        elif p.name == "finish":
            signature[p.name] = "i1"
        else:
            signature[p.name] = "i32"
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(kernel) -> tuple:
    """(registers per thread, bytes spilled per thread, shared memory bytes) of a compiled
    kernel, from cuobjdump's report of its cubin (Triton's wheel carries the tool). Triton's
    cubins report spills as STACK (the stack frame local memory holds), not LOCAL: both count."""
    import triton.backends.nvidia
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spilled = sum(int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", out))
    return (int(regs.group(1)) if regs else -1), spilled, kernel.metadata.shared


def loop_kernels(m, dtype, batch=16, sms=132, label=""):
    """(label, jit, constexprs, options, wide) of every kernel plan sequential's forward (with
    and without gradients) and backward launch for module instance `m` (backend triton), for
    `batch` rows on a GPU of `sms` multiprocessors (an H100 or H200 has 132)."""
    from .common import dot_type
    from .units import blocks
    module = sys.modules[type(m).__module__]
    kernel = next(k for k in vars(module) if k.endswith("_forward"))[:-len("_forward")]
    forward, backward = getattr(module, kernel + "_forward"), getattr(module, kernel + "_backward")
    meta = dict(m._meta, ACC=accumulator(dtype))
    label = label or kernel
    if hasattr(module, kernel + "_units"):  # tiled over units: D is a runtime integer
        matrices = len({p[0] for p in getattr(module, kernel + "_units")["products"]})
        tiles = blocks(batch, meta.pop("D"), sms, matrices)
        options = {k: tiles[k] for k in ("num_warps", "num_stages")}
        meta.update({k: tiles[k] for k in ("BB", "HB", "SYNC")}, DOT=dot_type(dtype))
        wide = ("p_dw",) + tuple(p.name for p in backward.params if p.name.startswith("p_dx"))
        return [(f"{label} forward", forward, dict(meta, SAVE=True, BK=tiles["BK"]), options, wide),
                (f"{label} forward, no gradients", forward, dict(meta, SAVE=False, BK=tiles["BK"]),
                 options, wide),
                (f"{label} backward", backward, dict(meta, BK=tiles["BK_BACK"]), options, wide)]
    from .loop import columns
    meta, _ = columns(meta, getattr(module, kernel + "_split", None))  # the block of a split axis
    return [(f"{label} forward", forward, dict(meta, SAVE=True), {}, ()),
            (f"{label} forward, no gradients", forward, dict(meta, SAVE=False), {}, ()),
            (f"{label} backward", backward, meta, {}, ())]


def chunk_launches(kernels, dtype, K, V, scalar_decay=False, n_h=1, label="chunk", prev=False):
    """(label, jit, constexprs, options, wide) of every kernel a forward and backward of plan
    chunk launches: `kernels` "linear_attention" (per-key or scalar decays) or "delta_rule" (n_h
    micro-steps a token) or "dplr" (n_h micro-steps), at key and value sizes K, V; prev: linear
    attention's outputs read the state before the step."""
    from . import chunk_delta, chunk_gla, dplr
    from .common import dot_type
    base = dict(ACC=accumulator(dtype), DOT=dot_type(dtype))
    blocks = dict(BK=chunk_gla.block(K, dtype), BV=chunk_gla.block(V, dtype))
    options = chunk_gla.launch(dtype)
    if kernels == "linear_attention":
        meta = dict(base, C=64, **blocks)
        strict = dict(meta, STRICT=int(prev))
        scores = dict(base, C=64, BK=blocks["BK"], SCALAR=scalar_decay, STRICT=int(prev))
        wide = ("b_ptr", "a_ptr", "da_ptr", "s_out_ptr", "dq_ptr", "dk_ptr")
        launches = [("states", chunk_gla._chunk_states, dict(meta, REVERSE=False)),
                    ("states' gradients", chunk_gla._chunk_states, dict(meta, REVERSE=True)),
                    ("scores", chunk_gla._chunk_scores, scores),
                    ("output", chunk_gla._chunk_output, strict),
                    ("dv", chunk_gla._chunk_dv, strict),
                    ("dq dk", chunk_gla._chunk_dqk, dict(meta, SCALAR=scalar_decay))]
    elif kernels == "dplr":
        PL = chunk_delta.slots(n_h, 64)[1]
        scores = dict(base, C=PL, BK=blocks["BK"], SCALAR=scalar_decay)
        pairs = dict(base, C=PL, **blocks, SCALAR=scalar_decay, STATES=0)
        states = dict(base, PL=PL, **chunk_delta.state_tiles(K))
        wide = ("b_ptr", "bq_ptr", "a_ptr", "da_ptr", "dq_ptr", "dk_ptr", "x_ptr", "inc_ptr", "dec_ptr",
                "s_in_ptr", "states_ptr", "w_ptr", "s_out_ptr")
        launches = [("scores (reads)", chunk_gla._chunk_scores, dict(scores, STRICT=1)),
                    ("scores (outputs)", chunk_gla._chunk_scores, dict(scores, STRICT=0)),
                    ("states and reads", dplr._dplr_states, dict(states, REVERSE=False)),
                    ("their gradients", dplr._dplr_states, dict(states, REVERSE=True)),
                    ("scores' gradients (reads)", chunk_gla._chunk_dqk, dict(pairs, DIAG=0)),
                    ("scores' gradients (outputs)", chunk_gla._chunk_dqk, dict(pairs, DIAG=1))]
    else:
        CT, PL = chunk_delta.slots(n_h, 64)
        meta = dict(base, NH=n_h, CT=CT, PL=PL)
        states = dict(meta, **chunk_delta.state_tiles(K))
        wide = ("gc_ptr", "a_ptr", "tinv_ptr", "s_out_ptr", "dq_ptr", "dk_ptr", "dw_ptr", "dgam_ptr",
                "dgl_ptr", "du_ptr", "dbeta_ptr", "ddelta_ptr")
        launches = [("WY form", chunk_delta._delta_wy, dict(meta, **blocks)),
                    ("states", chunk_delta._delta_states, dict(states, REVERSE=False)),
                    ("states' gradients", chunk_delta._delta_states, dict(states, REVERSE=True)),
                    ("output", chunk_delta._delta_output, dict(meta, BACKWARD=False, **blocks)),
                    ("dDelta in chunk", chunk_delta._delta_output, dict(meta, BACKWARD=True, **blocks)),
                    ("dq dk dW", chunk_delta._delta_dqkw, dict(meta, **blocks)),
                    ("WY form backward", chunk_delta._delta_wy_backward, dict(meta, **blocks))]
    return [(f"{label} {name} K={K} V={V}", jit, constexprs, options, wide)
            for name, jit, constexprs in launches]


def chunk_kernels(m, dtype, label=""):
    """chunk_launches of module instance `m` (backend triton, plan chunk)."""
    spec = getattr(type(m), "CHUNK_KERNELS", None)
    if spec is None:
        raise NotImplementedError(f"{type(m).__name__} launches no chunk kernels of the sequence plan")
    K, V = (int(n) for n in m.shapes[spec["state"]][-2:])
    label = label or f"{type(m).__name__} chunk"
    first = maxplus_launches(dtype, label) if spec.get("maxplus") else []
    return first + chunk_launches(spec["kernels"], dtype, K, V + spec.get("extra_values", 0),
                                  spec.get("scalar_decay", False), spec.get("n_h", 1), label,
                                  spec.get("prev", False))


def maxplus_launches(dtype, label):
    """The max-plus scan's kernels (the stabiliser before the chunkwise form), forward and
    backward, in the launches' format."""
    from . import maxplus
    meta, options = _scan_launch(dtype)
    return [(f"{label} max-plus scan", maxplus._maxplus_forward, meta, options, ()),
            (f"{label} max-plus scan backward", maxplus._maxplus_backward, meta, options, ())]


def scan_kernels(m, dtype, label=""):
    """(label, jit, constexprs, options, wide) of every kernel plans scan and newton launch for
    module instance `m` (backend triton): plan newton's generated Jacobian kernel, then the
    linear or block scan (forward, and plan scan's backward)."""
    from . import scan
    spec = getattr(type(m), "SCAN_KERNELS", None)
    if spec is None:
        raise NotImplementedError(f"{type(m).__name__} launches no scan kernels")
    label = label or type(m).__name__
    module = sys.modules[type(m).__module__]
    acc = accumulator(dtype)
    out = [(f"{label} Jacobian", jit, dict(m._meta, ACC=acc), {}, ())
           for name, jit in vars(module).items() if name.endswith("_jacobian")]
    meta, options = _scan_launch(dtype)
    if spec["block"] == 1:
        out.append((f"{label} linear scan", scan._linear_scan_forward, meta, options, ()))
        if spec["backward"]:
            out.append((f"{label} linear scan backward", scan._linear_scan_backward, meta, options, ()))
    else:  # its backward is the same kernel over reversed time
        out.append((f"{label} block scan k={spec['block']}", scan._block_kernel(spec["block"]), meta,
                    options, ()))
    return out


def _scan_launch(dtype):
    """(constexprs, options) of a launch of scan.py's and maxplus.py's kernels: their first
    config, the one a launch uses unless RCC_AUTOTUNE=1."""
    from . import scan
    config = scan.CONFIGS[0]
    meta = dict(ACC=accumulator(dtype), BLOCK_T=scan.BLOCK_T, **config.kwargs)
    return meta, dict(num_warps=config.num_warps)
