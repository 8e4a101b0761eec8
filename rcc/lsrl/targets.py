"""Target architectures: which stage kinds a layer of each provides, and the modules that run
them with set weights.

linear  a linear RNN layer (rcc's stdlib LinearRNN: h' = A h + B x + b) then a ReLU MLP; the
        paper's base model. Every construction is exact. It has no product: a program with one
        (f_ifelse_mul) is refused, with the ReLU construction (f_ifelse) as the way out.
"""
from __future__ import annotations

import functools

import torch

from ..errors import CompileError
from . import layers as L
from .schedule import schedule

TARGETS = ("linear",)


@functools.lru_cache(maxsize=None)
def _cell_class(path):
    from .. import api
    return api.compile(path, backend="torch", plan="auto")


class LinStateStage(torch.nn.Module):
    """A LinState stage as rcc's stdlib LinearRNN cell with set weights."""

    def __init__(self, A, B, b, h0):
        super().__init__()
        self.cell = _cell_class("stdlib/linear_rnn.rnn")(d_in=B.shape[1], d=A.shape[0]).double()
        with torch.no_grad():
            for name, value in (("A", A), ("B", B), ("b", b), ("h0", h0)):
                getattr(self.cell, name).copy_(torch.as_tensor(value))
        self.summary = f"LinearRNN({B.shape[1]} -> {A.shape[0]})"

    def forward(self, x):
        y, _ = self.cell(x)
        return y


class ReluStage(torch.nn.Sequential):
    def __init__(self, W, b):
        super().__init__(L.linear(W, b), torch.nn.ReLU())
        self.summary = f"Linear({W.shape[1]} -> {W.shape[0]}) + ReLU"


class ProductStage(L.Product):
    def __init__(self, W, b):
        super().__init__(W, b)
        self.summary = f"Linear({W.shape[1]} -> {W.shape[0]}) + product of halves"


def _refuse_products(target):
    def refuse(atom):
        if atom.kind == "mul":
            raise CompileError(f"a product of two values (Multiplicative) has no exact "
                               f"construction on target '{target}', whose layers are linear "
                               "RNNs and ReLU MLPs: write the condition with f_ifelse (ReLUs and "
                               "a large constant) or compile to a gated target", atom.span)
    return refuse


def build(prog, target) -> L.Stack:
    sched = schedule(prog, "LR", _refuse_products(target))
    reads, width = L.input_reads(prog)
    stages = []
    for stage in sched.stages:
        if stage.kind == "L":
            A, B, b, h0, reads_next = L.linstate_weights(prog, stage, reads, width)
            module = LinStateStage(A, B, b, h0)
        elif stage.kind == "R":
            W, b, reads_next = L.relu_weights(prog, stage, reads, width)
            module = ReluStage(W, b)
        else:
            W, b, reads_next = L.mul_weights(prog, stage, reads, width)
            module = ProductStage(W, b)
        stages.append(module)
        reads, width = reads_next, max([k for r in reads_next.values() for k in r] + [-1]) + 1
        width = _width(module, width)
    forms = [f for _, _, fs in prog.outputs for f in fs]
    W, b = L.form_rows(forms, reads, width)
    return L.Stack(prog.inputs, prog.outputs, stages, L.linear(W, b), target)


def _width(module, fallback):
    """The number of slots a stage outputs (units nobody reads still count)."""
    if isinstance(module, LinStateStage):
        return module.cell.A.shape[0]
    if isinstance(module, ReluStage):
        return module[0].out_features
    if isinstance(module, L.Product):
        return module.proj.out_features // 2
    return fallback
