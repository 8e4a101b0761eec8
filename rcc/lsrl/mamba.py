"""Target mamba: LinState and product stages as Mamba blocks, ReLU stages as MLPs.

A Mamba block here is in_proj -> (x, z); y = S6(x) (rcc's stdlib Mamba cell, one state per
channel: N = 1); out = y * silu(z). Its weights are set so that each stage is exact in floating
point where the block allows it:
  * delta = softplus(32) = 32 exactly (torch's softplus returns x past 20), B_t = C_t = 1 read
    from a channel held at 1, x_c = u_c / 32: each channel's state gets u_c exactly;
  * a LinState's decay a in {0, 1} is exp(32 * A) with A = -exp(A_log): A_log = -1000 gives
    A = -0.0 and a = 1, A_log = +1000 gives A = -inf and a = 0, both exact; 0 < a < 1 is
    A_log = log(-log(a) / 32), exact to rounding;
  * the gate silu(z) is silu(64) = 64 (sigmoid(64) rounds to 1): the output is 64 * y, read as
    y / 64 (a power of two: exact);
  * a product a * b: y = a (no memory), z = b + 64, so out = a * (b + 64); a second channel gives
    64 * a, and the difference is a * b: exact while b > -27 (so that sigmoid(b + 64) rounds to
    1) up to the rounding of b + 64 (none for integers; 2^-47 |a| in float64, 2^-18 |a| in
    float32 for b in [-27, 64)).
The S6 runs plan scan (its parallel form; exact here too: the decays are 0 and 1).
Mamba's transitions are diagonal with decays in (0, 1]: a LinState whose A is not diagonal with
entries in [0, 1] (a rotation, as in f_modulo_counter) has no construction, nor does reading a
state's value from before its update.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import CompileError
from . import layers as L
from .program import Form

DELTA = 32.0  # softplus(DELTA) == DELTA exactly
GATE = 64.0  # silu(GATE) == GATE exactly


class MambaStage(torch.nn.Module):
    """in_proj -> (x, z); y = S6(x) from initial state h0; out = y * silu(z)."""

    def __init__(self, W, b, a_log, h0, one, what):
        super().__init__()
        d = a_log.shape[0]
        self.in_proj = L.linear(W, b)
        self.s6 = L.stdlib_class("mamba", "scan")(d=d, R=1, N=1).double()
        with torch.no_grad():
            s6 = self.s6
            s6.A_log.copy_(torch.as_tensor(a_log).reshape(d, 1))
            s6.D.zero_()
            s6.W_r.zero_(), s6.W_dt.zero_(), s6.b_dt.fill_(DELTA)
            s6.W_B.zero_(), s6.W_C.zero_()
            s6.W_B[0, one] = 1.0  # B_t = C_t = the channel held at 1
            s6.W_C[0, one] = 1.0
        self.register_buffer("h0", torch.as_tensor(h0).reshape(d, 1))
        self.summary = f"Mamba block ({what}): Linear({W.shape[1]} -> {W.shape[0]}), S6(d={d}, " \
                       "N=1), y * silu(z)"

    def forward(self, u):
        x, z = self.in_proj(u).chunk(2, dim=-1)
        h0 = self.h0.to(x.dtype).expand(x.shape[0], *self.h0.shape)
        y, _ = self.s6(x, initial_state={"h": h0})
        return y * torch.nn.functional.silu(z)


def _decay_log(a):
    if a == 1.0:
        return -1000.0
    if a == 0.0:
        return 1000.0
    return math.log(-math.log(a) / DELTA)


def diagonal_decays(prog, ls, target, recurrence) -> list:
    """The decays of a LinState on a target whose recurrence is diagonal with decays in [0, 1]
    (Hawk, Mamba), or a located error."""
    A = ls.A
    if np.count_nonzero(A - np.diag(np.diag(A))):
        raise CompileError(f"the LinState of {_names(ls)} has a non-diagonal transition (a "
                           f"rotation or a coupling of its elements); {recurrence} is diagonal "
                           "with decays in [0, 1]: compile it to target linear, lstm or gru",
                           *_where(prog, ls))
    if ls.keep_old:
        name, _ = ls.atoms()[ls.keep_old[0]]
        raise CompileError(f"state '{name}' is read before its update; on target {target} a "
                           f"LinState's output is its new value: read {name}' instead",
                           *_where(prog, ls))
    decays = [float(a) for a in np.diag(A)]
    for a in decays:
        if not 0.0 <= a <= 1.0:
            raise CompileError(f"the LinState of {_names(ls)} decays by {a:g}: {recurrence}'s "
                               "decays lie in [0, 1]", *_where(prog, ls))
    return decays


def _names(ls):
    return ", ".join(name for name, _ in ls.states)


def linstate_stage(prog, stage, reads, width):
    """Channels: the LinStates' elements (their decays), the values carried (decay 0), and one
    channel held at 1 (the S6's B and C)."""
    forms, logs, h0, out = [], [], [], {}
    for ls in stage.items:
        decays = diagonal_decays(prog, ls, "mamba", "Mamba's S6")
        for i, (name, k) in enumerate(ls.atoms()):
            key = ("new", name, k, ())
            if key in prog.index:
                out[prog.index[key]] = {len(forms): 1.0 / GATE}
            logs.append(_decay_log(decays[i]))
            forms.append(ls.inputs[i].scale(1.0 / DELTA))
            h0.append(ls.init[i])
    for a in stage.carried:
        out[a] = {len(forms): 1.0 / GATE}
        forms.append(Form(prog, {a: 1.0 / DELTA}))
        logs.append(1000.0)
        h0.append(0.0)
    one = len(forms)
    forms.append(Form(prog, {}, 1.0))
    logs.append(1000.0)
    h0.append(0.0)
    gates = [Form(prog, {}, GATE)] * len(forms)
    return _stage(prog, forms, gates, logs, h0, one, reads, width, "LinStates"), out


def product_channels(prog, stage):
    """(values, gates, reads) of a product stage through an offset gate (Mamba's SiLU, Hawk's
    GeLU): for a * b, a gated by b + 64 and a gated by 64 (their difference is a * b); for a
    carried value, itself gated by 64."""
    forms, gates, out = [], [], {}
    for a in stage.items:
        left, right = prog.atoms[a].args
        out[a] = {len(forms): 1.0, len(forms) + 1: -1.0}
        forms += [left, left]
        gates += [right + GATE, Form(prog, {}, GATE)]
    for a in stage.carried:
        out[a] = {len(forms): 1.0 / GATE}
        forms.append(Form(prog, {a: 1.0}))
        gates.append(Form(prog, {}, GATE))
    return forms, gates, out


def product_stage(prog, stage, reads, width):
    """Channels with no memory (decay 0, so y = x), plus the channel held at 1."""
    forms, gates, out = product_channels(prog, stage)
    forms = [f.scale(1.0 / DELTA) for f in forms] + [Form(prog, {}, 1.0)]
    gates.append(Form(prog, {}, GATE))
    n = len(forms)
    return _stage(prog, forms, gates, [1000.0] * n, [0.0] * n, n - 1, reads, width,
                  "products"), out


def _stage(prog, forms, gates, logs, h0, one, reads, width, what):
    W, b = L.form_rows(forms + gates, reads, width)
    return MambaStage(W, b, np.asarray(logs), np.asarray(h0, dtype=np.float64), one, what)


def _where(prog, ls):
    """(span, notes): where the LinState's first state is updated."""
    return prog.where_state(ls.states[0][0])
