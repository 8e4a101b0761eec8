"""rcc.runtime.chunk against step-by-step loops of the recurrences: outputs, final states, gradients."""
import pytest
import torch

from rcc.runtime.chunk import chunk_delta_rule, chunk_linear_attention

F64 = torch.float64
CHUNK = 4


def linear_attention_loop(q, k, v, log_decay, S0):
    """S_t = exp(log_decay_t)[:, None] * S_{t-1} + k_t v_t^T; o_t = S_t^T q_t."""
    S = S0
    outs = []
    for t in range(q.shape[1]):
        S = log_decay[:, t].exp().unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(torch.einsum("nkv,nk->nv", S, q[:, t]))
    return torch.stack(outs, 1), S


def delta_rule_loop(q, k, u, beta, log_decay, S0):
    """Per token: M = exp(log_decay_t) S_{t-1}; per micro-step j: M += k_j (u_j - beta_j M^T k_j)^T."""
    S = S0
    outs = []
    for t in range(q.shape[1]):
        M = S if log_decay is None else log_decay[:, t, None, None].exp() * S
        for j in range(k.shape[2]):
            kj = k[:, t, j]
            prediction = torch.einsum("nkv,nk->nv", M, kj)
            M = M + kj.unsqueeze(-1) * (u[:, t, j] - beta[:, t, j, None] * prediction).unsqueeze(-2)
        S = M
        outs.append(torch.einsum("nkv,nk->nv", S, q[:, t]))
    return torch.stack(outs, 1), S


def leaf(x):
    return x.detach().requires_grad_(True)


def compare(fn, loop, inputs, atol=1e-10, rtol=1e-8, ref_inputs=None):
    """Run both sides, compare o, S_T and the gradients of a random cotangent w.r.t. every input."""
    ref_inputs = inputs if ref_inputs is None else ref_inputs
    o, S = fn(*inputs)
    o_ref, S_ref = loop(*ref_inputs)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, o_ref.to(o.dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(S, S_ref.to(S.dtype), atol=atol, rtol=rtol)
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, dtype=F64)
    w_S = torch.randn(S.shape, generator=gen, dtype=F64)
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    wanted_ref = [x for x in ref_inputs if x is not None and x.requires_grad]
    grads = torch.autograd.grad((o * w_o.to(o.dtype)).sum() + (S * w_S.to(S.dtype)).sum(), wanted)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (S_ref * w_S).sum(), wanted_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref.to(g.dtype), atol=atol, rtol=rtol)


def linear_attention_inputs(N, T, K, V, per_key, seed=0, log_decay=None, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, T, K, generator=gen, dtype=F64)
    k = torch.randn(N, T, K, generator=gen, dtype=F64)
    v = torch.randn(N, T, V, generator=gen, dtype=F64)
    if log_decay is None:
        # sigmoid-gate-like decays in (0, 1): log-decays in about (-4, -0.02)
        log_decay = torch.nn.functional.logsigmoid(
            2 * torch.randn(N, T, K if per_key else 1, generator=gen, dtype=F64) + 2)
    S0 = torch.randn(N, K, V, generator=gen, dtype=F64)
    return [leaf(x.to(dtype)) for x in (q, k, v, log_decay, S0)]


def delta_inputs(N, T, n_h, K, V, gated, seed=0, log_decay=None, unit_keys=True, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, T, K, generator=gen, dtype=F64)
    k = torch.randn(N, T, n_h, K, generator=gen, dtype=F64)
    if unit_keys:
        # beta in (0, 2) with unit keys: eigenvalues 1 - beta of the Householder factor in (-1, 1)
        k = k / k.norm(dim=-1, keepdim=True)
        beta = 2 * torch.rand(N, T, n_h, generator=gen, dtype=F64)
    else:
        k = 0.7 * k
        beta = 0.5 * torch.rand(N, T, n_h, generator=gen, dtype=F64)
    v = torch.randn(N, T, n_h, V, generator=gen, dtype=F64)
    u = beta.unsqueeze(-1) * v
    if gated and log_decay is None:
        log_decay = torch.nn.functional.logsigmoid(2 * torch.randn(N, T, generator=gen, dtype=F64) + 2)
    S0 = torch.randn(N, K, V, generator=gen, dtype=F64)
    log_decay = leaf(log_decay.to(dtype)) if gated else None
    q, k, u, beta, S0 = (leaf(x.to(dtype)) for x in (q, k, u, beta, S0))
    return [q, k, u, beta, log_decay, S0]


@pytest.mark.parametrize("T", [1, 7, CHUNK + 1, 2 * CHUNK + 3])
@pytest.mark.parametrize("K,V", [(1, 1), (1, 3), (5, 1), (5, 3)])
@pytest.mark.parametrize("per_key", [False, True])
def test_linear_attention_matches_loop(T, K, V, per_key):
    inputs = linear_attention_inputs(3, T, K, V, per_key)
    compare(lambda *x: chunk_linear_attention(*x, chunk_size=CHUNK), linear_attention_loop, inputs)


@pytest.mark.parametrize("chunk_size,T", [(16, 40), (9, 20), (64, 3)])
def test_linear_attention_sub_chunks_and_sizes(chunk_size, T):
    # chunk 16 -> 4 sub-chunks of 4; chunk 9 -> 3 of 3; chunk larger than T -> one chunk of T
    inputs = linear_attention_inputs(3, T, 5, 3, per_key=True, seed=2)
    compare(lambda *x: chunk_linear_attention(*x, chunk_size=chunk_size), linear_attention_loop, inputs)


def test_linear_attention_zero_state_default():
    q, k, v, g, S0 = linear_attention_inputs(2, 6, 3, 2, per_key=True)
    o, S = chunk_linear_attention(q, k, v, g, None, chunk_size=CHUNK)
    o_ref, S_ref = linear_attention_loop(q, k, v, g, torch.zeros_like(S0))
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


def extreme_log_decays(kind, shape, seed=3):
    gen = torch.Generator().manual_seed(seed)
    if kind == "all -60":
        return torch.full(shape, -60.0, dtype=F64)
    if kind == "all 0":
        return torch.zeros(shape, dtype=F64)
    # mostly gentle decays with an occasional -1e4 (a hard reset), some exactly 0
    g = -0.1 * torch.rand(shape, generator=gen, dtype=F64)
    g[torch.rand(shape, generator=gen) < 0.15] = -1e4
    g[torch.rand(shape, generator=gen) < 0.15] = 0.0
    return g


@pytest.mark.parametrize("kind", ["all -60", "some -1e4", "all 0"])
@pytest.mark.parametrize("per_key", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_linear_attention_extreme_decays(kind, per_key, dtype):
    N, T, K, V = 3, 2 * CHUNK + 3, 5, 3
    g = extreme_log_decays(kind, (N, T, K if per_key else 1))
    ref = linear_attention_inputs(N, T, K, V, per_key, log_decay=g)
    inputs = [leaf(x.to(dtype)) for x in ref]
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == F64 else dict(atol=2e-4, rtol=2e-4)
    compare(lambda *x: chunk_linear_attention(*x, chunk_size=CHUNK), linear_attention_loop, inputs,
            ref_inputs=ref, **tol)


def test_linear_attention_float32_default_chunk():
    ref = linear_attention_inputs(2, 150, 6, 4, per_key=True, seed=4)
    inputs = [leaf(x.float()) for x in ref]
    compare(chunk_linear_attention, linear_attention_loop, inputs, ref_inputs=ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("T", [1, 7, CHUNK + 1, 2 * CHUNK + 3])
@pytest.mark.parametrize("n_h", [1, 2, 3])
@pytest.mark.parametrize("K,V", [(1, 1), (5, 3)])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_matches_loop(T, n_h, K, V, gated):
    inputs = delta_inputs(3, T, n_h, K, V, gated)
    compare(lambda *x: chunk_delta_rule(*x, chunk_size=CHUNK), delta_rule_loop, inputs)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("K,V", [(1, 3), (5, 1)])
def test_delta_rule_unnormalised_keys(gated, K, V):
    inputs = delta_inputs(3, 2 * CHUNK + 3, 2, K, V, gated, seed=5, unit_keys=False)
    compare(lambda *x: chunk_delta_rule(*x, chunk_size=CHUNK), delta_rule_loop, inputs)


@pytest.mark.parametrize("chunk_size,T", [(8, 19), (64, 5)])
def test_delta_rule_chunk_sizes(chunk_size, T):
    inputs = delta_inputs(3, T, 2, 5, 3, gated=True, seed=6)
    compare(lambda *x: chunk_delta_rule(*x, chunk_size=chunk_size), delta_rule_loop, inputs)


@pytest.mark.parametrize("kind", ["all -60", "some -1e4", "all 0"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_delta_rule_extreme_gates(kind, dtype):
    N, T = 3, 2 * CHUNK + 3
    ref = delta_inputs(N, T, 2, 5, 3, gated=True, log_decay=extreme_log_decays(kind, (N, T)))
    inputs = [leaf(x.to(dtype)) for x in ref]
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == F64 else dict(atol=2e-4, rtol=2e-4)
    compare(lambda *x: chunk_delta_rule(*x, chunk_size=CHUNK), delta_rule_loop, inputs, ref_inputs=ref, **tol)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_float32_default_chunk(gated):
    ref = delta_inputs(2, 100, 2, 6, 4, gated=gated, seed=7)
    inputs = [None if x is None else leaf(x.float()) for x in ref]
    compare(chunk_delta_rule, delta_rule_loop, inputs, ref_inputs=ref, atol=2e-4, rtol=2e-4)


def test_delta_rule_zero_state_default():
    q, k, u, beta, g, S0 = delta_inputs(2, 6, 2, 3, 2, gated=True)
    o, S = chunk_delta_rule(q, k, u, beta, g, chunk_size=CHUNK)
    o_ref, S_ref = delta_rule_loop(q, k, u, beta, g, torch.zeros_like(S0))
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)
