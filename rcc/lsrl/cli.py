"""`rcc lsrl FILE.rnn --to TARGET`: compile, describe, check against the program, save."""
from __future__ import annotations

import torch

from . import describe, largest_difference, program
from .targets import build


def compare(module, stack, lengths=(1, 7, 33), batch=3, seed=0, dtype=torch.float64):
    """The largest difference between the program's outputs and the stack's, over random inputs
    (values in [-2, 2]) of each length."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [[4 * torch.rand(batch, T, *shape, generator=gen, dtype=torch.float64) - 2
               for shape in stack.input_shapes] for T in lengths]
    return largest_difference(module, stack, inputs, dtype)


def run(args, dims) -> int:
    module, prog = program(args.file, args.cell, dims)
    stack = build(prog, args.target)
    print(describe(stack))
    for dtype in (torch.float64, torch.float32):
        worst = compare(module, stack, dtype=dtype)
        print(f"largest difference from the program, {str(dtype)[6:]}, random inputs in [-2, 2], "
              f"T = 1, 7, 33: {worst:.3g}")
    if args.output:
        torch.save(stack.double(), args.output)
        print(f"wrote {args.output}")
    return 0
