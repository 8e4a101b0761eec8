"""Check that a parallel form reproduces the cell's step exactly.

A form (rcc.plans) is read off the IR's structure: the decay as a derivative, keys and values as
the arguments of an outer product, Householder factors from a pattern. Reading structure can be
fooled (a row mean has derivative one along all-ones, like the identity), so a plan is legal only
once its form, rebuilt element by element in sympy at the analysis's probe dims, equals the
step it replaces: the next state, each readout, and the log-decay real (the chunk kernels work
in log space). The comparison is numeric at random points with 40 digits, which separates any
two different analytic expressions of the probe symbols with probability one.
"""
from __future__ import annotations

import numpy as np
import sympy

from .generalize import dims_text
from .probe import Amax, IsMax, NoGrad, Probe, _map, flat, probe_dims

_DIGITS = 40
_POINTS = 2


def chunk_form_mismatch(form, cell) -> str | None:
    """Why `form` (a rcc.plans.ChunkForm of `cell`) is not exactly `cell`'s step; None if it is."""
    for offset in (0, 1):
        dims = probe_dims(cell, offset)
        probe = Probe(form.cell, dims)
        why = _check(form, probe, dims)
        if why:
            return why
    return None


def refusal(cell, state, structural_reason) -> str:
    """The reason the chunkwise form does not apply to matrix state `state`, from exact facts of
    the step where they decide it (not affine; a transition that mixes columns), else the
    structural reason the form's pattern gave."""
    dims = probe_dims(cell, 0)
    probe = Probe(cell, dims)
    S = probe.state_symbols[state]
    updates = dict(cell.updates)
    target = probe.values[updates[state]]
    symbols = set(flat(S))
    if any(sympy.diff(sympy.sympify(e), s).free_symbols & symbols
           for e in flat(target) for s in sympy.sympify(e).free_symbols & symbols):
        return f"the update of state '{state}' is not affine in it"
    why = _mixing(state, S, target, dims_text(dims))
    if why and "columns" in why:
        return (why + ": the chunkwise forms apply one K x K transition to every column "
                "(value) of the state")
    if why and any(w in structural_reason for w in ("varies along", "decay * S")):
        return (why + ": a chunkwise form takes a transition that mixes rows only as "
                "diagonal-plus-rank-one steps diag(e^g) S + a (b^T S) + k u^T (one read b @ S "
                "a step)")
    return structural_reason


def _check(form, probe, dims):
    values = probe.values
    S = probe.state_symbols[form.state]
    target = values[dict(form.cell.updates)[form.state]]
    at = dims_text(dims)
    decay = None
    if form.log_decay is not None:
        log_decay = values[form.log_decay]
        if not _real(log_decay):
            return _not_positive(form.state)
        decay = _map(sympy.exp, log_decay)
    if form.kind == "dplr":
        rebuilt, what = S, f"diagonal-plus-rank-one steps applied to {form.state}"
        for m in form.steps:
            g, a, b, k, u = (_obj(values[i]) for i in (m.log_decay, m.a, m.b, m.k, m.u))
            if not _real(g):
                return _not_positive(form.state)
            rebuilt = _map(sympy.exp, g)[:, None] * rebuilt \
                + a[:, None] * np.matmul(b, rebuilt)[None, :] + k[:, None] * u[None, :]
    elif form.kind == "linear":
        k, v = values[form.keys[0]], _obj(values[form.values[0]])
        if form.folded:  # each folded vector state is one more column, its value c
            updates = dict(form.cell.updates)
            S = np.concatenate([S] + [_obj(probe.state_symbols[z])[:, None]
                                      for z, _, _ in form.folded], -1)
            target = np.concatenate([_obj(target)] + [_obj(values[updates[z]])[:, None]
                                                      for z, _, _ in form.folded], -1)
            v = np.concatenate([v] + [_obj(values[c]).reshape(1) for _, c, _ in form.folded])
        scaled = S if decay is None else _obj(decay)[..., None] * S
        rebuilt = scaled + _obj(k)[..., :, None] * v[..., None, :]
        what = f"{form.state}' = decay * {form.state} + k v^T" + (
            " with " + ", ".join(z for z, _, _ in form.folded) + " as extra columns"
            if form.folded else "")
    else:
        rebuilt = S if decay is None else _obj(decay) * S
        for key, u, beta in zip(form.keys, form.values, form.betas):
            k = _obj(values[key])
            rebuilt = rebuilt - _obj(values[beta]) * k[:, None] * np.matmul(k, rebuilt)[None, :] \
                + k[:, None] * _obj(values[u])[None, :]
        what = f"a product of Householder factors (I - beta k k^T) applied to {form.state}"
    if not _equal(rebuilt, target):
        return _why_not(form.state, S, target, what, at)
    for m in form.maxplus:
        stepped = _map(lambda p, a, b: sympy.Max(p + a, b), values[m.leaf], values[m.a],
                       values[m.b])
        if not _equal(values[m.update], stepped):
            return f"state '{m.state}' is not m' = max(m + a, b) (checked at {at})"
    for i, (z, _, node) in enumerate(form.folded):
        q = _obj(values[form.readouts[0].q])
        column = target[..., target.shape[-1] - len(form.folded) + i]
        if not _equal(values[node], (q * column).sum(axis=-1)):
            return (f"an output's read of state '{z}' is not dot(q, {z}') (checked element by "
                    f"element at {at})")
    if form.folded:
        target = target[..., :target.shape[-1] - len(form.folded)]
    for r in form.readouts:
        q = _obj(values[r.q])
        read = (q[..., :, None] * (S if r.prev else target)).sum(axis=-2)
        if r.extra is not None:
            read = read + _obj(values[r.extra])
        if not _equal(values[r.node], read):
            return (f"an output's read of state '{form.state}' is not q @ {form.state}' "
                    f"(checked element by element at {at})")
    return None


def _real(log_decay) -> bool:
    """Whether every log-decay is provably real (its decay positive): the kernels take its log."""
    return all(sympy.sympify(e).is_extended_real for e in flat(log_decay))


def _not_positive(name):
    return (f"the decay of state '{name}' is not provably positive (the chunkwise form works with "
            "its logarithm): write it as exp(g), sigmoid(z) or a positive constant")


def _why_not(name, S, target, what, at):
    why = _mixing(name, S, target, at)
    if why:
        return f"{why}, so the update is not {what}"
    return f"the update of state '{name}' is not {what} (checked element by element at {at})"


def _mixing(name, S, target, at):
    """Name an element of the next state that reads another element of the state: one in
    another column first (what no chunkwise form allows), else one in another row."""
    symbols = {s: idx for idx, s in np.ndenumerate(S)}
    found = {}
    for idx, e in np.ndenumerate(target):
        for j in sorted(symbols[s] for s in sympy.sympify(e).free_symbols if s in symbols):
            if j != idx:
                axis = "rows" if j[-1] == idx[-1] else "columns"
                found.setdefault(axis, (idx, j))
    for axis in ("columns", "rows"):
        if axis in found:
            idx, j = found[axis]
            return (f"the transition of state '{name}' mixes its {axis} ({name}'[{_ix(idx)}] "
                    f"reads {name}[{_ix(j)}] at {at})")
    return None


def _ix(idx):
    return ", ".join(map(str, idx))


def _obj(x):
    return np.asarray(x, dtype=object)


# Functions that are not analytic: two expressions may agree on a region of random points and
# differ elsewhere ((S > 100) * 0.1 is zero at every point of [-0.9, 0.9])
_PIECEWISE = (sympy.Max, sympy.Min, sympy.Abs, sympy.sign, sympy.Heaviside, sympy.Piecewise,
              sympy.DiracDelta, NoGrad, Amax, IsMax)


def _analytic(pairs) -> list:
    """`pairs` with every piecewise subexpression replaced by a fresh symbol, one per distinct
    subexpression: what is then equal at random points is equal for every value of those
    symbols, so the originals are equal everywhere."""
    stand_in: dict = {}
    for pair in pairs:
        for e in pair:
            for sub in sympy.preorder_traversal(e):
                if isinstance(sub, _PIECEWISE) and sub not in stand_in:
                    stand_in[sub] = sympy.Dummy(f"piece{len(stand_in)}", real=True)
    if not stand_in:
        return pairs
    return [(x.xreplace(stand_in), y.xreplace(stand_in)) for x, y in pairs]


def _equal(a, b) -> bool:
    """Whether two object arrays of sympy expressions are equal: at random points (to 40 digits)
    once their piecewise parts are independent symbols (_analytic)."""
    a, b = np.broadcast_arrays(_obj(a), _obj(b))
    pairs = _analytic([(sympy.sympify(x), sympy.sympify(y)) for x, y in zip(flat(a), flat(b))])
    symbols = sorted({s for p in pairs for e in p for s in e.free_symbols}, key=str)
    rng = np.random.default_rng(0)
    for _ in range(_POINTS):
        point = {s: sympy.Float(rng.uniform(-0.9, 0.9), _DIGITS) for s in symbols}
        for x, y in pairs:
            try:  # the difference evaluated at 40 digits, before any rounding to doubles
                size, gap = (abs(complex(sympy.N(e.xreplace(point), _DIGITS))) for e in (x, x - y))
            except TypeError:  # not a number there (a pole, an unevaluated function): unproven
                return False
            if gap > 1e-25 * (1 + size):
                return False
    return True
