"""LSRL programs (examples/lsrl/*.rnn) compiled into stacks of linear-RNN, Mamba, LSTM and GRU
layers with `rcc.lsrl`, each stack run as an ordinary model beside the program on the inputs the
program is written for; prints the largest difference per program, target and dtype.

    python examples/lsrl_programs.py [--batch 8] [--lengths 1 7 20] [--seed 0]

A target a program has no construction on (a rotation on Hawk and Mamba, a product on the linear
RNN or the GRU) is listed with the reason rcc gives. Every construction is exact in float64 but
Hawk's counters (its RG-LRU cannot hold a decay of 1 with an input: see rcc/lsrl/hawk.py); in
float32, f_ifelse's large constant (the *Relu programs) keeps no digits of the values.
"""
from __future__ import annotations

import argparse
import os

import torch

import rcc
import rcc.lsrl

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lsrl")


def bits(B, _, T, gen):
    """Random bits."""
    return torch.randint(0, 2, (B, T), generator=gen).double()


def lookup_prompts(B, K, T, gen):
    """K (key, value) pairs, one number a step (keys distinct integers 1..9, values integers in
    [-20, 20]), then queries (integers 0..9: a missing key answers 0)."""
    keys = torch.stack([torch.randperm(9, generator=gen)[:K] + 1 for _ in range(B)]).double()
    values = torch.randint(-20, 21, (B, K), generator=gen).double()
    prompt = torch.stack([keys, values], -1).reshape(B, 2 * K)
    queries = torch.randint(0, 10, (B, max(T - 2 * K, 0)), generator=gen).double()
    return torch.cat([prompt, queries], 1)[:, :T]


def approximation_prompts(B, N, T, gen):
    """The function's values on N cells of [0, 1) (integers in [-9, 9]), then queries in [0, 1)."""
    values = torch.randint(-9, 10, (B, N), generator=gen).double()
    queries = torch.rand(B, max(T - N, 0), generator=gen, dtype=torch.float64)
    return torch.cat([values, queries], 1)[:, :T]


# (file, cell, dims, prompts, targets it compiles to, exact in float32)
PROGRAMS = [
    ("counting.rnn", None, {"n": 3}, bits, ("linear", "lstm", "gru"), True),
    ("lookup.rnn", "LookupMul", {"K": 3}, lookup_prompts, ("mamba", "lstm"), True),
    ("lookup.rnn", "LookupRelu", {"K": 3}, lookup_prompts, ("linear", "mamba", "lstm", "gru"),
     False),
    ("approximation.rnn", "ApproximateMul", {"N": 4}, approximation_prompts, ("mamba", "lstm"),
     True),
    ("approximation.rnn", "ApproximateRelu", {"N": 4}, approximation_prompts,
     ("linear", "mamba", "lstm", "gru"), False),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 7, 20])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"{'program':<17} {'target':<7} {'stages':>6} {'weights':>8} {'float64':>9} "
          f"{'float32':>9}")
    for path, cell, dims, prompts, _, _ in PROGRAMS:
        name = cell or os.path.splitext(path)[0]
        module, _ = rcc.lsrl.program(os.path.join(HERE, path), cell=cell, dims=dims)
        for target in rcc.lsrl.TARGETS:
            try:
                stack = rcc.lsrl.compile(os.path.join(HERE, path), to=target, cell=cell,
                                         dims=dims, module=module)
            except rcc.CompileError as e:
                print(f"{name:<17} {target:<7} no construction: {e.message.split(':')[0]}")
                continue
            gen = torch.Generator().manual_seed(args.seed)
            size = next(iter(dims.values()))
            inputs = [(prompts(args.batch, size, T, gen),) for T in args.lengths]
            d64, d32 = (rcc.lsrl.largest_difference(module, stack, inputs, dtype)
                        for dtype in (torch.float64, torch.float32))
            weights = sum(p.numel() for p in stack.parameters())
            print(f"{name:<17} {target:<7} {len(stack.stages):>6} {weights:>8} {d64:>9.3g} "
                  f"{d32:>9.3g}")


if __name__ == "__main__":
    main()
