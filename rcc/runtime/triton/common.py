"""What the Triton kernels share: the devices and dtypes they run, autotuning (opt-in).

Kernels run on CUDA tensors; on CPU, Triton's interpreter runs them when TRITON_INTERPRET=1 is set
before triton is imported (slow: for tests).
"""
from __future__ import annotations

import os

import torch

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    """Autotuning is opt-in (RCC_AUTOTUNE=1): each config is a compile, and benchmarking them
    on the first call of every new key made first calls take minutes at model sizes."""
    return os.environ.get("RCC_AUTOTUNE", "0") not in ("", "0") and not interpreted()


def tuned(*key, configs=None):
    """The kernel's first config of `configs` (default: 4 warps; one config is never
    benchmarked), or with RCC_AUTOTUNE=1, triton.autotune over them all (1, 2, 4 or 8 warps by
    default) keyed on the constexprs named in `key`, its choices cached on disk."""
    import triton
    configs = configs or [triton.Config({}, num_warps=w) for w in (4, 1, 2, 8)]
    if not autotuning():
        return triton.autotune(configs=configs[:1], key=list(key))
    return triton.autotune(configs=configs, key=list(key), cache_results=True)


def strided(seq) -> list:
    """Per-step arguments [N, T, ...] as a loop kernel reads them: pointer, time stride, row
    stride ([T, N, ...] without a copy)."""
    return [a for x in seq for a in (x, x.stride(1), x.stride(0))]


def output_grads(grads, out_shapes, N, T, dtype, device) -> list:
    """The outputs' gradients as a backward loop kernel reads them (strided); an output without
    one is a row of zeros read with zero strides."""
    import math

    from ..layout import rows
    out = []
    for g, shape in zip(grads, out_shapes):
        if g is None:
            g = torch.zeros(1, 1, math.prod(shape), dtype=dtype, device=device).expand(N, T, -1)
        out.append(rows(g, 2))
    return strided(out)


def save_loop(ctx, run_forward, spec, tensors):
    """The forward of a loop's autograd.Function: run it saving what its backward kernel reads
    (`kept`), and the tensors for autograd's in-place check."""
    results, kept = run_forward(spec, tensors, save=True)
    ctx.save_for_backward(*tensors)  # backward reads `kept`; this makes autograd check versions
    ctx.spec, ctx.kept, ctx.shapes = spec, kept, [t.shape for t in tensors]
    return results


def accumulator(dtype):
    import triton.language as tl
    # half precisions compute and keep the state in float32
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_type(dtype):
    """The products' operand type: half types on tensor cores (float32 accumulate), float32
    and float64 exactly. The interpreter's half-type products are wrong (Triton 3.9): there,
    they run in float32."""
    import triton.language as tl
    if dtype in (torch.bfloat16, torch.float16) and not interpreted():
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return accumulator(dtype)


def check(tensors, what="backend 'triton'"):
    """One float dtype, and a device the kernels can run on."""
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"{what} needs one float dtype for inputs, params and states; got "
                            f"{dtype} and {t.dtype}")
        if t.device != device:
            raise RuntimeError(f"{what}: tensors on {device} and {t.device}")
    if dtype not in _FLOATS:
        raise TypeError(f"{what} runs float32, float64, float16 and bfloat16, not {dtype}")
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(f"{what} runs its Triton kernels on CUDA tensors; got tensors on {device}."
                           " On CPU, set TRITON_INTERPRET=1 before importing triton to run them in "
                           "Triton's interpreter (slow, for tests), or use backend='torch' or 'cpp'")
