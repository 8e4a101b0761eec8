"""Harness of the semantics tests: run a compiled cell on random float64 data and compare it,
forward and backward, with a reference that the test writes for ONE sequence element.

The generated module runs batched values (those depending on inputs or states) with a leading
axis N = B * heads and hoists unbatched ones (params, constants) out of the time loop. The
reference here knows none of that: it loops over batch, heads and time in Python and evaluates
each step on unbatched tensors, where torch follows NumPy's broadcasting and matmul rules.

A reference step is `step(v) -> dict`: `v` has one attribute per input (its value at this step),
param, state (its current value) and dim; the dict maps each output name to its value and
`"s'"` to the next value of each updated state (states left out keep their value).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

import rcc

F64 = torch.float64


def as_tensor(v):
    return v if torch.is_tensor(v) else torch.tensor(float(v), dtype=F64)


# ---- the language's functions, written from their definitions on unbatched tensors -----------
def _sigmoid(t):
    return 1 / (1 + torch.exp(-as_tensor(t)))


def _softplus(t):
    return torch.log1p(torch.exp(as_tensor(t)))


def _reduce_all_or_axis(fn):
    def reduce(x, axis=None):
        x = as_tensor(x)
        if x.dim() == 0:
            return x
        return fn(x.reshape(-1), 0) if axis is None else fn(x, axis)
    return reduce


def _logsumexp(x, axis):
    top = x.amax(axis, keepdim=True).detach()
    return (torch.log(torch.exp(x - top).sum(axis, keepdim=True)) + top).squeeze(axis)


def _softmax(x, axis=-1):
    e = torch.exp(x - x.amax(axis, keepdim=True).detach())
    return e / e.sum(axis, keepdim=True)


def _logaddexp(a, b):
    a, b = as_tensor(a), as_tensor(b)
    top = torch.maximum(a, b).detach()
    return top + torch.log(torch.exp(a - top) + torch.exp(b - top))


def _sum(x, axis=None):
    return _reduce_all_or_axis(lambda t, ax: t.sum(ax))(x, axis)


FUNCTIONS = {
    "sigmoid": _sigmoid,
    "tanh": lambda t: (1 - torch.exp(-2 * as_tensor(t))) / (1 + torch.exp(-2 * as_tensor(t))),
    "relu": lambda t: torch.where(as_tensor(t) > 0, as_tensor(t), 0 * as_tensor(t)),
    "silu": lambda t: as_tensor(t) * _sigmoid(t),
    "gelu": lambda t: 0.5 * as_tensor(t) * (1 + torch.erf(as_tensor(t) / math.sqrt(2))),
    "exp": lambda t: torch.exp(as_tensor(t)),
    "log": lambda t: torch.log(as_tensor(t)),
    "log1p": lambda t: torch.log(1 + as_tensor(t)),
    "expm1": lambda t: torch.exp(as_tensor(t)) - 1,
    "softplus": _softplus,
    "logsigmoid": lambda t: -_softplus(-as_tensor(t)),
    "sqrt": lambda t: as_tensor(t) ** 0.5,
    "rsqrt": lambda t: as_tensor(t) ** -0.5,
    "abs": lambda t: torch.abs(as_tensor(t)),
    "sign": lambda t: torch.sign(as_tensor(t)),
    "sin": lambda t: torch.sin(as_tensor(t)),
    "cos": lambda t: torch.cos(as_tensor(t)),
    "max": lambda a, b: torch.maximum(as_tensor(a), as_tensor(b)),
    "min": lambda a, b: torch.minimum(as_tensor(a), as_tensor(b)),
    "logaddexp": _logaddexp,
    "where": lambda c, a, b: torch.where(as_tensor(c) != 0, as_tensor(a), as_tensor(b)),
    "sum": _sum,
    "mean": _reduce_all_or_axis(lambda t, ax: t.sum(ax) / t.shape[ax]),
    "amax": _reduce_all_or_axis(lambda t, ax: t.amax(ax)),
    "logsumexp": _reduce_all_or_axis(_logsumexp),
    "softmax": _softmax,
    "dot": lambda a, b: a * b if as_tensor(a).dim() == 0 or as_tensor(b).dim() == 0 else a @ b,
    "outer": lambda a, b: a[:, None] * b[None, :],
    "l2norm": lambda x: x / torch.sqrt(_sum(x * x) + 1e-6),
    "eye": lambda n: torch.eye(n, dtype=F64),
    "zeros": lambda *shape: torch.zeros(shape, dtype=F64),
    "ones": lambda *shape: torch.ones(shape, dtype=F64),
    "concat": lambda *xs, axis=0: torch.cat([as_tensor(x) for x in xs], axis),
    "stack": lambda *xs, axis=0: torch.stack([as_tensor(x) for x in xs], axis),
    "split": lambda x, n, axis=0: torch.tensor_split(x, n, axis),
    "chunk": lambda x, n, axis=0: torch.tensor_split(x, n, axis),
}


def run_python(lines: str, values: dict, result: str):
    """Run statements written in the cell language's Python-compatible subset (assignments,
    destructuring, arithmetic, @, indexing) on unbatched tensors and return `result`'s value."""
    scope = {"__builtins__": {}, **FUNCTIONS, **values}
    exec(lines, scope)  # noqa: S102 - test-only evaluation of the test's own expressions
    return eval(result, scope)  # noqa: S307


# ---- running both sides ----------------------------------------------------------------------
_CLASSES: dict = {}  # (source text or path, cell) -> compiled class
def instantiate(source, cell=None, params="normal", backend="torch", **dims):
    """Compile and instantiate a cell in float64; params="normal" redraws them N(0, 0.7) so that
    every value is exercised away from the default initializer's narrow range."""
    key = (source, cell, backend)
    if key not in _CLASSES:  # parsing dominates these tiny tests; each source is parsed once
        _CLASSES[key] = rcc.compile(source, cell=cell, backend=backend)
    # made in float64: backend cpp builds its kernel for the default dtype when a module is
    # made (and the backward meanwhile), a build a float32 module converted by .double() wastes
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m = _CLASSES[key](**dims).double()
    finally:
        torch.set_default_dtype(default)
    if params == "normal":
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.7)
    return m


def run_and_compare(m, step, *, B=2, T=2, heads=(2,), given=None, defaults=None, grads=True,
                    inputs=None, rtol=1e-7, atol=1e-9):
    """Run module `m` and the per-element reference `step`, compare outputs, final states and
    gradients (w.r.t. inputs, params and given initial states). `given` names the states passed
    through `initial_state` (default: all); `defaults` gives the reference's initial value of
    the others (unbatched tensors). Returns (outputs, final) of the module."""
    given = list(m.STATES) if given is None else list(given)
    defaults = dict(defaults or {})
    missing = [s for s in m.STATES if s not in given and s not in defaults]
    assert not missing, f"no reference initial value for states {missing}"
    xs = {}
    for name in m.INPUTS:
        if inputs and name in inputs:
            xs[name] = inputs[name].detach().clone().requires_grad_(grads)
        else:
            shape = (B, T, *heads, *m.shapes[name])
            xs[name] = torch.randn(shape, dtype=F64, requires_grad=grads)
    s0 = {name: torch.randn((B, *heads, *m.shapes[name]), dtype=F64, requires_grad=grads)
          for name in given}
    out, final = m(**xs, initial_state=s0)
    outs = (out,) if len(m.OUTPUTS) == 1 else out
    assert isinstance(outs, tuple) and len(outs) == len(m.OUTPUTS)
    assert set(final) == set(m.STATES)

    params = dict(m.named_parameters())
    ref_outs = {name: [] for name in m.OUTPUTS}  # name -> list over (b, head) of [T, ...] tensors
    ref_final = {name: [] for name in m.STATES}
    head_index = list(_head_indices(heads))
    for b in range(B):
        for h in head_index:
            state = {s: (s0[s][(b, *h)] if s in s0 else as_tensor(defaults[s]).to(F64))
                     for s in m.STATES}
            per_t = {name: [] for name in m.OUTPUTS}
            for t in range(T):
                v = SimpleNamespace(**m.dims, **params, **state,
                                    **{n: x[(b, t, *h)] for n, x in xs.items()})
                res = step(v)
                unknown = set(res) - set(m.OUTPUTS) - {s + "'" for s in m.STATES}
                assert not unknown, f"reference step returned unknown keys {unknown}"
                for name in m.OUTPUTS:
                    per_t[name].append(as_tensor(res[name]))
                state = {s: as_tensor(res.get(s + "'", state[s])) for s in m.STATES}
            for name in m.OUTPUTS:
                ref_outs[name].append(torch.stack(per_t[name]))
            for s in m.STATES:
                ref_final[s].append(state[s])
    ref_out = tuple(_unflatten(torch.stack(ref_outs[n]), B, heads, time_axis=True)
                    for n in m.OUTPUTS)
    ref_fin = {s: _unflatten(torch.stack(ref_final[s]), B, heads, time_axis=False)
               for s in m.STATES}

    for name, got, want in zip(m.OUTPUTS, outs, ref_out):
        assert got.dtype == F64, f"output {name} has dtype {got.dtype}"
        assert got.shape == want.shape, f"output {name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda s: f"output {name}: {s}")
    for name in m.STATES:
        got, want = final[name], ref_fin[name]
        assert got.shape == want.shape, f"state {name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda s: f"state {name}: {s}")

    if grads:
        wrt = {**{f"input {k}": v for k, v in xs.items()}, **{f"param {k}": v for k, v in params.items()},
               **{f"initial state {k}": v for k, v in s0.items()}}
        weights = [torch.randn(o.shape, dtype=F64) for o in outs]
        fin_weights = {s: torch.randn(final[s].shape, dtype=F64) for s in m.STATES}

        def loss(os, fin):
            total = sum((o * w).sum() for o, w in zip(os, weights))
            return total + sum((fin[s] * fin_weights[s]).sum() for s in m.STATES)

        got = _grads(loss(outs, final), wrt)
        want = _grads(loss(ref_out, ref_fin), wrt)
        for key in wrt:
            torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol,
                                       msg=lambda s: f"gradient w.r.t. {key}: {s}")
    return out, final


def _grads(loss, wrt: dict) -> dict:
    tensors = list(wrt.values())
    if not torch.is_tensor(loss) or not loss.requires_grad:
        return {k: torch.zeros_like(v) for k, v in wrt.items()}
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(wrt.items(), gs)}


def _head_indices(heads):
    if not heads:
        yield ()
        return
    for i in range(heads[0]):
        for rest in _head_indices(heads[1:]):
            yield (i, *rest)


def _unflatten(stacked, B, heads, time_axis):
    """[B * prod(heads), (T,) ...] in (b, heads) order -> [B, (T,) *heads, ...]."""
    y = stacked.reshape(B, *heads, *stacked.shape[1:])
    return y.movedim(1 + len(heads), 1) if time_axis else y
