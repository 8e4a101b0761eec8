"""Targets lstm and gru: LinStates (and, for the LSTM, ReLUs and products) as layers of rcc's
stdlib LSTM and GRU cells (torch.nn.LSTM / GRU's equations and layouts).

Both run their cells where they are linear in floating point:
  * saturation: sigmoid(1000) rounds to 1 and sigmoid(-1000) to 0, so a gate held at +-1000 is
    exactly open or shut;
  * small signals: every value v is carried as EPS * v with EPS = 2^-50, where tanh(x) returns x
    (|x| < 2^-28 in float64, 2^-12 in float32): exact while |v| < 2^22 (4e6). Reading a layer's
    output multiplies by 2^50, exactly.
LSTM (c' = f c + i g, h' = o tanh(c')): o = 1, so h = c. A LinState unit has f = i = 1 and
g = EPS (B u + b) + (A - I) h, so c' = EPS (A S + B u + b): any A (rotations too). A ReLU unit
has f = 0, i = sigmoid(K v), g = EPS v: c' = EPS relu(v) (exact but for |v| < 37 / K, K = 2^40),
a product a * b has i = sigmoid(K (2a - 1)), g = EPS b: exact when a is 0 or 1 (a condition, as
in f_ifelse_mul; otherwise a is thresholded at 1/2), a carried value i = 1, f = 0, g = EPS v.
GRU (h' = (1 - z) n + z h, n = tanh(x_n + r (W_hn h + b_hn))): r = 1, z = 1/2 exactly, so
h' = EPS (A S + B u + b) for W_hn = 2A - I and x_n = 2 EPS (B u + b): any A. The GRU cannot
zero its old state through its gates, so ReLUs run in ReLU MLPs between GRU layers, and a
product has no construction.
"""
from __future__ import annotations


import numpy as np
import torch

from . import layers as L

SAT = 1000.0  # sigmoid(+-SAT) is exactly 1 / 0
EPS = 2.0 ** -50  # tanh(EPS * v) == EPS * v
K = 2.0 ** 40  # sigmoid(K v) is exactly the step of v, but for |v| < 37 / K


class GatedStage(torch.nn.Module):
    """An rcc stdlib LSTM or GRU cell with set weights, from set initial states."""

    def __init__(self, kind, weights, h0, what):
        super().__init__()
        d = h0.shape[0]
        self.cell = L.stdlib_class(kind)(d_in=weights["weight_ih"].shape[1], d=d).double()
        with torch.no_grad():
            for name, value in weights.items():
                getattr(self.cell, name).copy_(torch.as_tensor(value))
        self.register_buffer("h0", torch.as_tensor(h0))
        self.kind = kind
        self.summary = f"{kind.upper()}({weights['weight_ih'].shape[1]} -> {d}): {what}"

    def forward(self, u):
        h0 = self.h0.to(u.dtype).expand(u.shape[0], -1)
        states = {"h": h0, "c": h0} if self.kind == "lstm" else {"h": h0}
        y, _ = self.cell(u, initial_state=states)
        return y


class _Units:
    """Rows of one layer: per unit, each gate's pre-activation as (form, scale, bias) and its
    row of the recurrent weight (over this layer's units)."""

    def __init__(self, prog, gates):
        self.prog, self.gates = prog, gates
        self.rows = {g: [] for g in gates}  # gate -> [(form or None, scale, bias)]
        self.recurrent = {g: [] for g in gates}  # gate -> [{unit: weight}]
        self.h0 = []

    def add(self, recurrent=None, h0=0.0, **gates):
        for g in self.gates:
            form, scale, bias = gates.get(g, (None, 0.0, 0.0))
            self.rows[g].append((form, scale, bias))
            self.recurrent[g].append(dict(recurrent or {}) if g in ("g", "n") else {})
        self.h0.append(h0)
        return len(self.h0) - 1

    def weights(self, reads, width):
        d = len(self.h0)
        W_ih, W_hh, b_ih = [], [], []
        for g in self.gates:
            forms = [f if f is not None else L.Form(self.prog, {}, 0.0) for f, _, _ in self.rows[g]]
            W, b = L.form_rows(forms, reads, width)
            scale = np.array([s for _, s, _ in self.rows[g]])
            W_ih.append(W * scale[:, None])
            b_ih.append(b * scale + np.array([bias for _, _, bias in self.rows[g]]))
            R = np.zeros((d, d))
            for j, row in enumerate(self.recurrent[g]):
                for k, w in row.items():
                    R[j, k] += w
            W_hh.append(R)
        return {"weight_ih": np.concatenate(W_ih), "weight_hh": np.concatenate(W_hh),
                "bias_ih": np.concatenate(b_ih), "bias_hh": np.zeros(len(self.gates) * d)}


def _linstate_units(units, prog, stage, out, a_scale):
    """Units of the stage's LinStates (and their kept old values) and of its carried values:
    A - I (LSTM) or 2A - I (GRU) as the candidate's recurrent rows, the inputs scaled."""
    for ls in stage.items:
        n = len(ls.init)
        A = np.zeros((n + len(ls.keep_old),) * 2)
        A[:n, :n] = ls.A
        for j, i in enumerate(ls.keep_old):
            A[n + j, i] = 1.0
        start = len(units.h0)
        inputs = ls.inputs + [L.Form(prog, {}, 0.0)] * len(ls.keep_old)
        init = list(ls.init) + [0.0] * len(ls.keep_old)
        for r in range(A.shape[0]):
            rec = {start + c: a_scale * A[r, c] - (1.0 if r == c else 0.0)
                   for c in range(A.shape[0]) if A[r, c] or r == c}
            units.add_linstate(inputs[r], rec, EPS * init[r])
        for i, (name, k) in enumerate(ls.atoms()):
            key = ("new", name, k, ())
            if key in prog.index:
                out[prog.index[key]] = {start + i: 1.0 / EPS}
        for j, i in enumerate(ls.keep_old):
            name, k = ls.atoms()[i]
            out[prog.index[("old", name, k, ())]] = {start + n + j: 1.0 / EPS}


class _LstmUnits(_Units):
    def __init__(self, prog):
        super().__init__(prog, ("i", "f", "g", "o"))

    def add_linstate(self, form, recurrent, h0):
        return self.add(recurrent, h0, i=(None, 0.0, SAT), f=(None, 0.0, SAT), g=(form, EPS, 0.0),
                        o=(None, 0.0, SAT))

    def add_gated(self, gate, value):
        """c' = sigmoid(gate) * EPS value, the old c forgotten."""
        return self.add(None, 0.0, i=gate, f=(None, 0.0, -SAT), g=(value, EPS, 0.0),
                        o=(None, 0.0, SAT))


class _GruUnits(_Units):
    def __init__(self, prog):
        super().__init__(prog, ("r", "z", "n"))

    def add_linstate(self, form, recurrent, h0):
        return self.add(recurrent, h0, r=(None, 0.0, SAT), z=(None, 0.0, 0.0),
                        n=(form, 2 * EPS, 0.0))


def lstm_stage(prog, stage, reads, width):
    units, out = _LstmUnits(prog), {}
    if stage.kind == "L":
        _linstate_units(units, prog, stage, out, 1.0)
        what = "LinStates"
    else:
        for a in stage.items:
            at = prog.atoms[a]
            if at.kind == "relu":  # i = step(v), g = EPS v
                out[a] = {units.add_gated((at.args[0], K, 0.0), at.args[0]): 1.0 / EPS}
            else:  # i = step(a - 1/2), g = EPS b
                left, right = at.args
                out[a] = {units.add_gated((left.scale(2.0) - 1.0, K, 0.0), right): 1.0 / EPS}
        what = "ReLUs (input gates)" if stage.kind == "R" else "products (input gates)"
    for a in stage.carried:  # i = 1, f = 0: c' = EPS v
        out[a] = {units.add_gated((None, 0.0, SAT), L.Form(prog, {a: 1.0})): 1.0 / EPS}
    module = GatedStage("lstm", units.weights(reads, width), np.asarray(units.h0), what)
    return module, out, len(units.h0)


def gru_stage(prog, stage, reads, width):
    units, out = _GruUnits(prog), {}
    _linstate_units(units, prog, stage, out, 2.0)
    for a in stage.carried:  # A = 0: the recurrent row -1
        out[a] = {units.add_linstate(L.Form(prog, {a: 1.0}), {len(units.h0): -1.0}, 0.0):
                  1.0 / EPS}
    module = GatedStage("gru", units.weights(reads, width), np.asarray(units.h0),
                        "LinStates")
    return module, out, len(units.h0)
