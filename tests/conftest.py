import os
import tempfile

import pytest
import torch

# Generated modules go to a per-session cache, never the user's ~/.cache.
os.environ.setdefault("RCC_CACHE_DIR", tempfile.mkdtemp(prefix="rcc-test-cache-"))
# Inductor's on-disk cache keys a compiled graph by the graph, not by the custom ops it calls:
# graphs compiled against an older rcc.runtime.ops would be run again
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rcc-test-inductor-"))
# Backend triton's kernels run on CPU tensors in Triton's interpreter (read when triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.join(ROOT, "stdlib")


def stdlib(name: str) -> str:
    return os.path.join(STDLIB, name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


STDLIB_DIMS = {  # small odd sizes; d=1 somewhere
    "mingru.rnn": {"d_in": 3, "d": 5}, "minlstm.rnn": {"d_in": 2, "d": 1},
    "hgrn.rnn": {"d": 3}, "rglru.rnn": {"d": 4}, "mamba.rnn": {"d": 3, "R": 2, "N": 5},
    "gla.rnn": {"K": 3, "V": 2}, "retnet.rnn": {"H": 2, "K": 3, "V": 2},
    "deltanet.rnn": {"K": 3, "V": 2}, "gated_deltanet.rnn": {"K": 4, "V": 3},
    "deltaproduct.rnn": {"K": 3, "V": 2, "n_h": 2},
    "pararnn_gru.rnn": {"d_in": 3, "d": 5}, "pararnn_lstm.rnn": {"d_in": 2, "d": 3},
    "elman.rnn": {"d_in": 2, "d": 3}, "lstm.rnn": {"d_in": 2, "d": 3}, "gru.rnn": {"d_in": 2, "d": 3},
    "mlstm.rnn": {"K": 2, "V": 3}, "slstm.rnn": {"d_in": 2, "d": 3},
    "kda.rnn": {"K": 3, "V": 2}, "rwkv7.rnn": {"K": 4, "V": 3}, "comba.rnn": {"K": 3, "V": 5},
    "mamba2.rnn": {"N": 3, "P": 2}, "lru.rnn": {"H": 3, "N": 2},
    "linear_rnn.rnn": {"d_in": 3, "d": 4},
    "rwkv6.rnn": {"K": 3, "V": 4}, "linear_attention.rnn": {"K": 3, "V": 2},
}


def cell_inputs(m, B, T, heads, dtype=torch.float64):
    """Inputs [B, T, *heads, ...] in each stdlib input's natural range, and initial states, all
    requiring grad."""
    gen = torch.Generator().manual_seed(1)
    xs = []
    for n in m.INPUTS:
        x = torch.randn(B, T, *heads, *m.shapes[n], generator=gen, dtype=torch.float64) * 0.5
        if n in ("k", "kk", "p"):  # the delta rule's keys (write, removal) are unit vectors
            x = x / x.norm(dim=-1, keepdim=True)
        if n in ("q", "k") and m.CELL == "LinearAttention":  # phi(x) = elu(x) + 1 > 0
            x = torch.nn.functional.elu(x) + 1
        if n in ("beta", "a"):  # learning rates in (0, 1)
            x = torch.sigmoid(x)
        if n in ("gk", "g", "log_w"):  # log-space decays
            x = -torch.nn.functional.softplus(x)
        if n in ("dt",):  # step sizes, after their softplus
            x = torch.nn.functional.softplus(x)
        xs.append(x.to(dtype).requires_grad_())
    init = {s: (torch.randn(B, *heads, *m.shapes[s], generator=gen, dtype=torch.float64) * 0.5)
            .to(dtype).requires_grad_() for s in m.STATES}
    return xs, init


def run_with_grads(m, xs, init):
    """Outputs and final states, and the gradients of a random projection of them with respect
    to inputs, initial states and params."""
    out, final = m(*xs, initial_state=init)
    out = out if isinstance(out, tuple) else (out,)
    tensors = list(out) + [final[s] for s in m.STATES]
    gen = torch.Generator().manual_seed(2)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
               for t in tensors)
    wrt = xs + list(init.values()) + [p for p in m.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return tensors, grads
