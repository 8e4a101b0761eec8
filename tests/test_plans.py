"""Every legal plan equals the sequential reference on every stdlib cell it applies to: outputs,
final states and gradients (inputs, params, initial states), float64, odd T, with heads."""
import pytest
import torch

import rcc
from conftest import stdlib
from rcc.errors import CompileError

DIMS = {  # small odd sizes; d=1 somewhere
    "mingru.rnn": {"d_in": 3, "d": 5}, "minlstm.rnn": {"d_in": 2, "d": 1},
    "hgrn.rnn": {"d": 3}, "rglru.rnn": {"d": 4}, "mamba.rnn": {"d": 3, "R": 2, "N": 5},
    "gla.rnn": {"K": 3, "V": 2}, "retnet.rnn": {"H": 2, "K": 3, "V": 2},
    "deltanet.rnn": {"K": 3, "V": 2}, "gated_deltanet.rnn": {"K": 4, "V": 3},
    "deltaproduct.rnn": {"K": 3, "V": 2, "n_h": 2},
    "pararnn_gru.rnn": {"d_in": 3, "d": 5}, "pararnn_lstm.rnn": {"d_in": 2, "d": 3},
    "elman.rnn": {"d_in": 2, "d": 3}, "lstm.rnn": {"d_in": 2, "d": 3}, "gru.rnn": {"d_in": 2, "d": 3},
    "mlstm.rnn": {"K": 2, "V": 3}, "slstm.rnn": {"d_in": 2, "d": 3},
}
CASES = [(name, plan) for name in sorted(DIMS) for plan in rcc.analyze(stdlib(name)).plans
         if plan != "sequential"]


def _inputs(m, B, T, heads):
    gen = torch.Generator().manual_seed(1)
    xs = []
    for n in m.INPUTS:
        x = torch.randn(B, T, *heads, *m.shapes[n], generator=gen, dtype=torch.float64) * 0.5
        if n in ("k",):  # the delta rule's keys are unit vectors
            x = x / x.norm(dim=-1, keepdim=True)
        if n in ("beta",):
            x = torch.sigmoid(x)
        if n in ("gk", "g"):  # log-space decays
            x = -torch.nn.functional.softplus(x)
        xs.append(x.requires_grad_())
    init = {s: (torch.randn(B, *heads, *m.shapes[s], generator=gen, dtype=torch.float64) * 0.5)
            .requires_grad_() for s in m.STATES}
    return xs, init


def _run(m, xs, init):
    out, final = m(*xs, initial_state=init)
    out = out if isinstance(out, tuple) else (out,)
    tensors = list(out) + [final[s] for s in m.STATES]
    gen = torch.Generator().manual_seed(2)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)
    wrt = xs + list(init.values()) + [p for p in m.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return tensors, grads


def _compare(name, plan, T, heads=(2,)):
    dims = DIMS[name]
    ref = rcc.compile(stdlib(name))(**dims).double()
    mod = rcc.compile(stdlib(name), plan=plan)(**dims).double()
    if plan == "chunk":
        mod.chunk_size = 4  # a module attribute, default 64
    mod.load_state_dict(ref.state_dict())
    xs, init = _inputs(ref, 2, T, heads)
    want, want_grads = _run(ref, xs, init)
    got, got_grads = _run(mod, xs, init)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    for w, g in zip(want_grads, got_grads):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)
    return mod


@pytest.mark.parametrize("name,plan", CASES)
@pytest.mark.parametrize("T", [1, 7, 9])  # 9: one more than two chunks of 4
def test_plan_equals_sequential(name, plan, T):
    _compare(name, plan, T)


@pytest.mark.parametrize("name,plan", [c for c in CASES if c[0] in ("mingru.rnn", "gla.rnn")])
def test_plan_without_heads(name, plan):
    _compare(name, plan, 5, heads=())


@pytest.mark.parametrize("name,plan", [
    ("gru.rnn", "scan"), ("lstm.rnn", "newton"), ("mingru.rnn", "newton"), ("gru.rnn", "chunk"),
    ("mingru.rnn", "chunk"),
])
def test_illegal_plan_names_the_state_and_reason(name, plan):
    with pytest.raises(CompileError) as e:
        rcc.compile(stdlib(name), plan=plan)
    msg = str(e.value)
    assert f"plan '{plan}'" in msg and "state 'h'" in msg and "legal plans" in msg
