"""Weights of a scheduled LSRL program: each stage as a torch module over the previous stage's
output vector, and the stack that runs them.

A stage's output is a vector of slots; `reads` says how to read each value (atom) the later
stages need from it, as a combination of slots. Bypasses are exact: through a LinState a value is
a unit with no recurrence (h' = x), through a ReLU stage the pair ReLU(x) - ReLU(-x) (one unit for
a value that is never negative), through a product stage x * 1.
"""
from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch

from .program import Form


@functools.lru_cache(maxsize=None)
def stdlib_class(name, plan="auto"):
    """The module class of rcc's stdlib cell NAME (stdlib/NAME.rnn), on backend torch."""
    from .. import api
    return api.compile(str(resources.files("rcc.stdlib").joinpath(f"{name}.rnn")),
                       backend="torch", plan=plan)


def form_rows(forms, reads, width):
    """The weight rows and biases computing `forms` from a vector read through `reads`."""
    W = np.zeros((len(forms), width))
    b = np.zeros(len(forms))
    for r, f in enumerate(forms):
        b[r] = f.const
        for a, c in f.terms.items():
            for slot, k in reads[a].items():
                W[r, slot] += c * k
    return W, b


def input_reads(prog):
    """Slots of the input vector: the inputs flattened and concatenated in declaration order."""
    reads, n = {}, 0
    for name, shape in prog.inputs:
        for k in range(int(np.prod(shape))):
            key = ("input", name, k, ())
            if key in prog.index:
                reads[prog.index[key]] = {n: 1.0}
            n += 1
    return reads, n


def linstate_weights(prog, stage, reads, width):
    """One LinState stage: S' = A S + B x + b for the stage's LinStates (and their kept old
    values), units h' = x for the values carried through. Returns (A, B, b, h0, new reads)."""
    forms, h0, out = [], [], {}
    blocks = []
    for ls in stage.items:
        n, start = len(ls.init), len(forms)
        keep = ls.keep_old
        blocks.append((start, ls.A, keep))
        forms += ls.inputs + [Form(prog, {}, 0.0)] * len(keep)
        h0 += list(ls.init) + [0.0] * len(keep)
        for i, (name, k) in enumerate(ls.atoms()):
            key = ("new", name, k, ())
            if key in prog.index:
                out[prog.index[key]] = {start + i: 1.0}
        for j, i in enumerate(keep):
            name, k = ls.atoms()[i]
            out[prog.index[("old", name, k, ())]] = {start + n + j: 1.0}
    for a in stage.carried:
        out[a] = {len(forms): 1.0}
        forms.append(Form(prog, {a: 1.0}))
        h0.append(0.0)
    d = len(forms)
    A = np.zeros((d, d))
    for start, block, keep in blocks:
        n = block.shape[0]
        A[start:start + n, start:start + n] = block
        for j, i in enumerate(keep):  # the kept old value: the S element of the last step
            A[start + n + j, start + i] = 1.0
    B, b = form_rows(forms, reads, width)
    return A, B, b, np.asarray(h0), out


def relu_weights(prog, stage, reads, width):
    """One ReLU stage: W x + b then ReLU; a carried value as ReLU(x) - ReLU(-x), or ReLU(x) alone
    when it is a ReLU's output (never negative)."""
    forms, out = [], {}
    for a in stage.items:
        out[a] = {len(forms): 1.0}
        forms.append(prog.atoms[a].args[0])
    for a in stage.carried:
        x = Form(prog, {a: 1.0})
        if prog.atoms[a].kind == "relu":
            out[a] = {len(forms): 1.0}
            forms.append(x)
        else:
            out[a] = {len(forms): 1.0, len(forms) + 1: -1.0}
            forms += [x, -x]
    W, b = form_rows(forms, reads, width)
    return W, b, out


def mul_weights(prog, stage, reads, width):
    """One product stage: (W1 x + b1) * (W2 x + b2); a carried value as x * 1."""
    left, right, out = [], [], {}
    for a in stage.items:
        out[a] = {len(left): 1.0}
        left.append(prog.atoms[a].args[0])
        right.append(prog.atoms[a].args[1])
    for a in stage.carried:
        out[a] = {len(left): 1.0}
        left.append(Form(prog, {a: 1.0}))
        right.append(Form(prog, {}, 1.0))
    W1, b1 = form_rows(left, reads, width)
    W2, b2 = form_rows(right, reads, width)
    return np.concatenate([W1, W2]), np.concatenate([b1, b2]), out


def linear(W, b) -> torch.nn.Linear:
    m = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.as_tensor(W))
        m.bias.copy_(torch.as_tensor(b))
    return m


class Product(torch.nn.Module):
    """LSRL's Multiplicative after a Linear: the product of the two halves of W x + b."""

    def __init__(self, W, b):
        super().__init__()
        self.proj = linear(W, b)

    def forward(self, x):
        left, right = self.proj(x).chunk(2, dim=-1)
        return left * right


class Stack(torch.nn.Module):
    """The compiled program: the inputs flattened and concatenated, the stages, a readout Linear
    to the outputs. Called like the cell: m(*inputs) with inputs [B, T, *shape]; returns the
    outputs [B, T, *shape] (a tuple when there are several)."""

    def __init__(self, inputs, outputs, stages, readout, target):
        super().__init__()
        self.input_shapes = [tuple(s) for _, s in inputs]
        self.output_names = [name for name, _, _ in outputs]
        self.output_shapes = [tuple(s) for _, s, _ in outputs]
        self.stages = torch.nn.ModuleList(stages)
        self.readout = readout
        self.target = target

    def forward(self, *inputs):
        if len(inputs) != len(self.input_shapes):
            raise TypeError(f"the program takes {len(self.input_shapes)} inputs, got "
                            f"{len(inputs)}")
        B, T = inputs[0].shape[:2]
        x = torch.cat([v.reshape(B, T, -1) for v in inputs], dim=-1)
        for stage in self.stages:
            x = stage(x)
        y = self.readout(x)
        outs, k = [], 0
        for shape in self.output_shapes:
            n = int(np.prod(shape))
            outs.append(y[..., k:k + n].reshape(B, T, *shape))
            k += n
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f"target={self.target!r}"
