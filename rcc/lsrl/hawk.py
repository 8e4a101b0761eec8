"""Target hawk: LinStates and products as Hawk's recurrent block, ReLU stages as MLPs.

The block (Griffin's temporal-mixing block without its Conv1D, whose kernel would be the
identity): in_proj -> (g, x); y = RG-LRU(x) (rcc's stdlib RGLRU cell); out = GeLU(g) * y. The
RG-LRU is h' = a h + sqrt(1 - a^2) (i x) with a = sigmoid(Lambda)^(8 r), i = sigmoid(...), r =
sigmoid(...). Its weights are set as follows:
  * i = sigmoid(1000) = 1 exactly; r = 1 exactly, so log a = -8 softplus(-Lambda);
  * decay 0 (a carried value, a product's factor): Lambda = -1000 gives log a = -8000, a = 0 and
    sqrt(1 - a^2) = 1: h' = x, exact;
  * decay 1 (a counter): a = 1 leaves no input (sqrt(1 - a^2) = 0), so the block runs
    log a = -2^-61: a rounds to 1 (exactly, in float64 and float32) while sqrt(1 - a^2) =
    2^-30 (to the rounding of softplus), and the input is divided by that factor. The state
    gains u (1 + e), e a few units of rounding per step: approximate;
  * a decay 0 < a < 1 likewise, to rounding;
  * the gate GeLU(64) = 64 (the normal CDF rounds to 1): out = 64 y, read as y / 64; a product
    a * b: y = a, g = b + 64, minus a second channel 64 a, as on target mamba (exact while
    b > -55, to the rounding of b + 64).
The RG-LRU runs plan scan (its parallel form). It is diagonal with decays in [0, 1]: other
LinStates (rotations) have no construction, nor has a state read before its update.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import layers as L
from .mamba import GATE, diagonal_decays, product_channels
from .program import Form

SAT = 1000.0
LOG_A_ONE = -2.0 ** -61  # a = exp(LOG_A_ONE) rounds to 1; sqrt(-expm1(2 LOG_A_ONE)) = 2^-30


def _lambda_for(log_a):
    """Lambda with -8 softplus(-Lambda) = log_a (r = 1)."""
    return -math.log(math.expm1(-log_a / 8))


class HawkStage(torch.nn.Module):
    """in_proj -> (g, x); y = RG-LRU(x) from initial state h0; out = GeLU(g) * y."""

    def __init__(self, W, b, lam, h0, what):
        super().__init__()
        d = lam.shape[0]
        self.in_proj = L.linear(W, b)
        self.rglru = L.stdlib_class("rglru", "scan")(d=d).double()
        with torch.no_grad():
            cell = self.rglru
            cell.Wa.zero_(), cell.ba.fill_(SAT), cell.Wx.zero_(), cell.bx.fill_(SAT)
            cell.Lambda.copy_(torch.as_tensor(lam))
        self.register_buffer("h0", torch.as_tensor(h0))
        self.summary = f"Hawk block ({what}): Linear({W.shape[1]} -> {W.shape[0]}), " \
                       f"RG-LRU(d={d}), GeLU(g) * y"

    def forward(self, u):
        g, x = self.in_proj(u).chunk(2, dim=-1)
        y, _ = self.rglru(x, initial_state={"h": self.h0.to(x.dtype).expand(x.shape[0], -1)})
        return torch.nn.functional.gelu(g) * y


def _input_scale(log_a):
    return 1.0 / math.sqrt(-math.expm1(2 * log_a))


def linstate_stage(prog, stage, reads, width):
    gates, forms, lams, h0, out = [], [], [], [], {}
    for ls in stage.items:
        decays = diagonal_decays(prog, ls, "hawk", "Hawk's RG-LRU")
        for i, (name, k) in enumerate(ls.atoms()):
            a = decays[i]
            log_a = LOG_A_ONE if a == 1.0 else (-8 * SAT if a == 0.0 else math.log(a))
            key = ("new", name, k, ())
            if key in prog.index:
                out[prog.index[key]] = {len(forms): 1.0 / GATE}
            lams.append(_lambda_for(log_a) if a != 0.0 else -SAT)
            forms.append(ls.inputs[i].scale(_input_scale(log_a)))
            h0.append(ls.init[i])
            gates.append(Form(prog, {}, GATE))
    for a in stage.carried:
        out[a] = {len(forms): 1.0 / GATE}
        forms.append(Form(prog, {a: 1.0}))
        lams.append(-SAT)
        h0.append(0.0)
        gates.append(Form(prog, {}, GATE))
    return _stage(gates, forms, lams, h0, reads, width, "LinStates"), out


def product_stage(prog, stage, reads, width):
    forms, gates, out = product_channels(prog, stage)
    n = len(forms)
    return _stage(gates, forms, [-SAT] * n, [0.0] * n, reads, width, "products"), out


def _stage(gates, forms, lams, h0, reads, width, what):
    W, b = L.form_rows(gates + forms, reads, width)
    return HawkStage(W, b, np.asarray(lams), np.asarray(h0, dtype=np.float64), what)
