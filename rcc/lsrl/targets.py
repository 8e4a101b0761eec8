"""Target architectures: which stage kinds a layer of each provides, and the modules that run
them with set weights.

linear  a linear RNN layer (rcc's stdlib LinearRNN: h' = A h + B x + b) then a ReLU MLP; the
        paper's base model. Every construction is exact. It has no product: a program with one
        (f_ifelse_mul) is refused, with the ReLU construction (f_ifelse) as the way out.
hawk    Hawk's recurrent blocks (rcc's stdlib RG-LRU cell inside in_proj and the GeLU gate) for
        LinStates and products, ReLU MLPs for ReLUs; its counters are approximate (rcc.lsrl.hawk).
mamba   Mamba blocks (rcc's stdlib S6 cell inside in_proj and the SiLU gate) for LinStates and
        products, ReLU MLPs for ReLUs (rcc.lsrl.mamba says which constructions are exact).
lstm    LSTM layers only (rcc's stdlib LSTM cell): LinStates, ReLUs and products through its gates.
gru     GRU layers (rcc's stdlib GRU cell) for LinStates, ReLU MLPs for ReLUs; no products
        (rcc.lsrl.gated says why, and where both are exact).
"""
from __future__ import annotations


import torch

from ..errors import CompileError
from . import layers as L
from . import gated, hawk, mamba
from .schedule import schedule

TARGETS = ("linear", "hawk", "mamba", "lstm", "gru")


class LinStateStage(torch.nn.Module):
    """A LinState stage as rcc's stdlib LinearRNN cell with set weights."""

    def __init__(self, A, B, b, h0):
        super().__init__()
        self.cell = L.stdlib_class("linear_rnn")(d_in=B.shape[1], d=A.shape[0]).double()
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


_NO_PRODUCT = {
    "linear": "whose layers are linear RNNs and ReLU MLPs",
    "gru": "whose gates scale the candidate by (1 - z) and keep z of the old state, so no gate "
           "multiplies two of this step's values alone",
}


def _refuse_products(target):
    def refuse(atom):
        if atom.kind == "mul":
            raise CompileError(f"a product of two values (Multiplicative) has no construction on "
                               f"target '{target}', {_NO_PRODUCT[target]}: write the condition "
                               "with f_ifelse (ReLUs and a large constant), or compile to target "
                               "mamba or lstm", atom.span, atom.notes)
    return refuse


PATTERNS = {"linear": "LR", "hawk": "LMR", "mamba": "LMR", "lstm": "LRM", "gru": "LR"}


def _stage_module(target, prog, stage, reads, width):
    """(module, reads of its output, its width) for one stage on `target`."""
    if target == "lstm":
        return gated.lstm_stage(prog, stage, reads, width)
    if stage.kind == "R":
        W, b, out = L.relu_weights(prog, stage, reads, width)
        return ReluStage(W, b), out, W.shape[0]
    if target == "gru":
        return gated.gru_stage(prog, stage, reads, width)
    if target in ("mamba", "hawk"):
        kind = mamba if target == "mamba" else hawk
        build_stage = kind.linstate_stage if stage.kind == "L" else kind.product_stage
        module, out = build_stage(prog, stage, reads, width)
        return module, out, module.in_proj.out_features // 2
    if stage.kind == "L":
        A, B, b, h0, out = L.linstate_weights(prog, stage, reads, width)
        return LinStateStage(A, B, b, h0), out, A.shape[0]
    W, b, out = L.mul_weights(prog, stage, reads, width)
    return ProductStage(W, b), out, W.shape[0] // 2


def build(prog, target) -> L.Stack:
    refuse = _refuse_products(target) if "M" not in PATTERNS[target] else None
    sched = schedule(prog, PATTERNS[target], refuse)
    reads, width = L.input_reads(prog)
    stages = []
    for stage in sched.stages:
        module, reads, width = _stage_module(target, prog, stage, reads, width)
        stages.append(module)
    forms = [f for _, _, fs in prog.outputs for f in fs]
    W, b = L.form_rows(forms, reads, width)
    return L.Stack(prog.inputs, prog.outputs, stages, L.linear(W, b), target)
