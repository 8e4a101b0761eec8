"""LSRL's compilation target: a cell written with LSRL's primitives (`use lsrl`) turned into a
stack of layers of a recurrent architecture, with set weights, that computes the same outputs.

    stack = rcc.lsrl.compile("examples/lsrl/counting.rnn", to="linear", dims={"n": 3})
    y = stack(x)                                      # equals the cell's outputs

The pipeline (Petrov et al. 2024, LSRL): the step as affine forms over ReLUs, products and
LinStates (rcc.lsrl.program), debranched into stages of one kind each (rcc.lsrl.schedule), each
stage a layer of the target with its weights set (rcc.lsrl.layers, rcc.lsrl.targets).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..errors import CompileError
from .layers import Stack
from .program import Program, extract
from .schedule import Schedule
from .targets import TARGETS, build

__all__ = ["compile", "program", "largest_difference", "TARGETS", "Stack", "Program", "Schedule"]


def program(source_or_path, cell=None, dims=None, module=None):
    """(the cell's own module, its LSRL Program). `module`: an instance of the compiled cell whose
    param values to use (by default a new one, initialised as the cell says)."""
    from .. import api
    from ..elaborate import NeedStatic, elaborate

    dims = dict(dims or {})
    try:  # as elaborated (CellIR.origins: errors at the fn calls in the cell)
        prog, ast = api._load(source_or_path, cell)
        cell_ir = elaborate(ast, prog.fns, dims)
    except NeedStatic as need:
        raise CompileError(f"dim{'s' if len(need.names) > 1 else ''} "
                           f"{', '.join(need.names)} need{'s' if len(need.names) == 1 else ''} a "
                           "value (--dims NAME=INT)", need.span) from None
    values = {}
    for d in cell_ir.dims:
        value = dims.get(d.name, d.static if d.static is not None else d.default)
        if value is None:
            raise CompileError(f"dim '{d.name}' needs a value (--dims {d.name}=INT): an LSRL "
                               "program is compiled at fixed sizes", d.span)
        values[d.name] = int(value)
    if module is None:
        cls = api.compile(source_or_path, cell=cell, backend="torch", plan="sequential",
                          dims={k: v for k, v in values.items()})
        module = cls(**values).double()
    params = {name: p.detach().cpu().double().numpy() for name, p in module.named_parameters()}
    return module, extract(cell_ir, values, params)


def compile(source_or_path, to="linear", cell=None, dims=None, module=None) -> Stack:  # noqa: A001
    """The stack of `to`'s layers (one of TARGETS) computing the cell's outputs, in float64 (call
    .float() for float32). Raises CompileError, located at the operation, for a cell that is not
    an LSRL program or has no construction on that target."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; expected one of {', '.join(TARGETS)}")
    _, prog = program(source_or_path, cell, dims, module)
    return build(prog, to)


def describe(stack: Stack) -> str:
    """One line per stage: its kind, its units, and the module that runs it."""
    lines = [f"{stack.target} stack of {len(stack.stages)} stage(s)"]
    for k, st in enumerate(stack.stages):
        lines.append(f"  {k}: {getattr(st, 'summary', type(st).__name__)}")
    n_params = sum(int(np.prod(p.shape)) for p in stack.parameters())
    lines.append(f"  readout: Linear({stack.readout.in_features} -> {stack.readout.out_features});"
                 f" {n_params} weights in all")
    return "\n".join(lines)


def largest_difference(module, stack: Stack, inputs, dtype=torch.float64) -> float:
    """The largest difference between the program's outputs (`module`, the cell's own module) and
    the stack's, over `inputs` (an iterable of tuples of input tensors), both run in `dtype`
    (on copies: the caller's weights are not rounded)."""
    module, stack = copy.deepcopy(module).to(dtype), copy.deepcopy(stack).to(dtype)
    worst = 0.0
    for xs in inputs:
        xs = [x.to(dtype) for x in xs]
        with torch.no_grad():
            want, _ = module(*xs)
            got = stack(*xs)
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        worst = max([worst] + [(w - g).abs().max().item() for w, g in zip(want, got)])
    return worst
