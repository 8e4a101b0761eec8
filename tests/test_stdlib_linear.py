"""Linear-attention / SSM stdlib cells against hand-written loops of the papers' equations.

Each reference below is written from the paper (not from the .rnn text), in float64, with the
heads as an explicit axis: inputs [B, T, H, ...] and states [B, H, ...] as the cells take them.
Every case compares forward outputs, final states and the gradients with respect to the inputs,
the params and (when given) the initial states, on tiny odd sizes.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import rcc
from conftest import stdlib

f64 = torch.float64
B = 2
# (T, head count H, (K, V), with an initial state)
CASES = list(itertools.product((1, 7), (1, 2), ((3, 5), (1, 2)), (False, True)))
CASE_IDS = [f"T{t}-H{h}-K{kv[0]}V{kv[1]}-{'init' if i else 'zero'}" for t, h, kv, i in CASES]


def leaf(*shape, fn=None):
    x = torch.randn(*shape, dtype=f64)
    if fn is not None:
        x = fn(x)
    return x.detach().requires_grad_()


def unit_keys(*shape):
    return leaf(*shape, fn=lambda x: F.normalize(x, dim=-1))


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_same(module, inputs, init, reference, params=()):
    """Run the compiled cell and the reference; compare outputs, final states and gradients."""
    out, final = module(**inputs, initial_state=init)
    out_ref, final_ref = reference(**inputs, init=init)
    out, out_ref = as_tuple(out), as_tuple(out_ref)
    assert len(out) == len(out_ref)
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b)
    assert set(final) == set(final_ref)
    for name in final_ref:
        torch.testing.assert_close(final[name], final_ref[name], msg=f"final state {name}")
    # random cotangents, so that every output element and state element carries gradient
    names = sorted(final_ref)
    weights = [torch.randn_like(y) for y in out_ref] + [torch.randn_like(final_ref[n]) for n in names]
    leaves = list(inputs.values()) + list(params) + list((init or {}).values())

    def loss(outs, fin):
        values = list(outs) + [fin[n] for n in names]
        return sum((v * w).sum() for v, w in zip(values, weights))

    grads = torch.autograd.grad(loss(out, final), leaves)
    grads_ref = torch.autograd.grad(loss(out_ref, final_ref), leaves)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(g, g_ref, msg=lambda m, i=i: f"gradient of leaf {i}: {m}")


def stack_time(steps):
    return torch.stack(steps, 1)


# ---- GLA ------------------------------------------------------------------------------------
def gla_reference(q, k, v, gk, init):
    K = q.shape[-1]
    S = init["S"] if init else q.new_zeros(q.shape[0], q.shape[2], K, v.shape[-1])
    outs = []
    for t in range(q.shape[1]):
        # Diag(alpha_t) S + k v^T, alpha_t = exp(gk_t)
        S = torch.exp(gk[:, t]).unsqueeze(-1) * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] / math.sqrt(K)))
    return stack_time(outs), {"S": S}


@pytest.mark.parametrize("T,H,KV,with_init", CASES, ids=CASE_IDS)
def test_gla(T, H, KV, with_init):
    K, V = KV
    m = rcc.compile(stdlib("gla.rnn"))(K=K, V=V).double()
    inputs = dict(q=leaf(B, T, H, K), k=leaf(B, T, H, K), v=leaf(B, T, H, V),
                  gk=leaf(B, T, H, K, fn=F.logsigmoid))
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(m, inputs, init, gla_reference)


# ---- RetNet ---------------------------------------------------------------------------------
def retnet_reference(q, k, v, init):
    H, K = q.shape[2], q.shape[3]
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=f64))  # one decay per head, section 2.2
    S = init["S"] if init else q.new_zeros(q.shape[0], H, K, v.shape[-1])
    outs = []
    for t in range(q.shape[1]):
        S = gamma[:, None, None] * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * K ** -0.5))
    return stack_time(outs), {"S": S}


@pytest.mark.parametrize("T,H,KV,with_init", CASES, ids=CASE_IDS)
def test_retnet(T, H, KV, with_init):
    K, V = KV
    m = rcc.compile(stdlib("retnet.rnn"))(H=H, K=K, V=V).double()
    inputs = dict(q=leaf(B, T, H, K), k=leaf(B, T, H, K), v=leaf(B, T, H, V))
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(m, inputs, init, retnet_reference)


def test_retnet_decays_are_the_papers():
    # with k = e_0 written once and nothing after, the memory decays by gamma_h per step
    m = rcc.compile(stdlib("retnet.rnn"))(H=3, K=1, V=1).double()
    T = 4
    q = torch.ones(1, T, 3, 1, dtype=f64)
    k = torch.zeros(1, T, 3, 1, dtype=f64)
    k[:, 0] = 1
    v = torch.ones(1, T, 3, 1, dtype=f64)
    _, final = m(q, k, v)
    gamma = torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128], dtype=f64)
    torch.testing.assert_close(final["S"].reshape(3), gamma ** (T - 1), rtol=0, atol=1e-15)


# ---- Mamba (S6) -----------------------------------------------------------------------------
def mamba_reference(m):
    def run(x, init):
        A = -torch.exp(m.A_log)  # [d, N]
        Bsz, T, H, d = x.shape
        h = init["h"] if init else x.new_zeros(Bsz, H, d, A.shape[1])
        ys = []
        for t in range(T):
            xt = x[:, t]
            delta = F.softplus(xt @ m.W_r.T @ m.W_dt.T + m.b_dt)  # [B, H, d]
            Bt, Ct = xt @ m.W_B.T, xt @ m.W_C.T  # [B, H, N]
            # zero-order hold for A, Euler for B (Mamba, section 3.5)
            h = torch.exp(delta[..., None] * A) * h + (delta * xt)[..., None] * Bt[..., None, :]
            ys.append(torch.einsum("bhdn,bhn->bhd", h, Ct) + m.D * xt)
        return stack_time(ys), {"h": h}
    return run


@pytest.mark.parametrize("T,H,dims,with_init", [
    (T, H, dims, i) for T, H, dims, i in
    itertools.product((1, 7), (1, 2), ((3, 2, 5), (1, 1, 1)), (False, True))])
def test_mamba(T, H, dims, with_init):
    d, R, N = dims
    m = rcc.compile(stdlib("mamba.rnn"))(d=d, R=R, N=N).double()
    with torch.no_grad():  # move A_log and D off their constant initial values
        m.A_log.normal_()
        m.D.normal_()
    inputs = dict(x=leaf(B, T, H, d))
    init = {"h": leaf(B, H, d, N)} if with_init else None
    params = [m.A_log, m.D, m.W_r, m.W_dt, m.b_dt, m.W_B, m.W_C]
    assert_same(m, inputs, init, mamba_reference(m), params)


def test_mamba_default_state_size():
    m = rcc.compile(stdlib("mamba.rnn"))(d=2, R=1)
    assert m.A_log.shape == (2, 16)
    _, final = m(torch.randn(1, 3, 2))
    assert final["h"].shape == (1, 2, 16)


# ---- mLSTM ----------------------------------------------------------------------------------
def mlstm_reference(q, k, v, i_pre, f_pre, init):
    """The stabilised mLSTM (xLSTM appendix): states C [K, V], n [K], m."""
    Bsz, T, H, K = q.shape
    if init:
        C, n, m = init["C"], init["n"], init["m"]
    else:
        C, n, m = q.new_zeros(Bsz, H, K, v.shape[-1]), q.new_zeros(Bsz, H, K), q.new_zeros(Bsz, H)
    outs = []
    for t in range(T):
        log_f = F.logsigmoid(f_pre[:, t])
        m_new = torch.maximum(log_f + m, i_pre[:, t])
        i_gate = torch.exp(i_pre[:, t] - m_new)
        f_gate = torch.exp(log_f + m - m_new)
        key = k[:, t] / math.sqrt(K)  # k_t = W_k x_t / sqrt(d) in the paper
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * key[..., :, None] * v[:, t, ..., None, :]
        n = f_gate[..., None] * n + i_gate[..., None] * key
        m = m_new
        qt = q[:, t]
        numerator = torch.einsum("bhkv,bhk->bhv", C, qt)
        denominator = torch.maximum((n * qt).sum(-1).abs(), torch.exp(-m))
        outs.append(numerator / denominator[..., None])
    return stack_time(outs), {"C": C, "n": n, "m": m}


def mlstm_inputs(T, H, K, V):
    return dict(q=leaf(B, T, H, K), k=leaf(B, T, H, K), v=leaf(B, T, H, V),
                i_pre=leaf(B, T, H), f_pre=leaf(B, T, H, fn=lambda x: x + 2))


@pytest.mark.parametrize("T,H,KV,with_init", CASES, ids=CASE_IDS)
def test_mlstm(T, H, KV, with_init):
    K, V = KV
    m = rcc.compile(stdlib("mlstm.rnn"))(K=K, V=V).double()
    inputs = mlstm_inputs(T, H, K, V)
    init = {"C": leaf(B, H, K, V), "n": leaf(B, H, K), "m": leaf(B, H)} if with_init else None
    assert_same(m, inputs, init, mlstm_reference)


def test_mlstm_matches_unstabilised_form():
    """The paper's unstabilised equations (i = exp(i~), f = sigmoid(f~), max(|n^T q|, 1)) give
    the same outputs; the states differ from the stabilised ones by the factor exp(m)."""
    K, V, T, H = 3, 2, 6, 2
    m = rcc.compile(stdlib("mlstm.rnn"))(K=K, V=V).double()
    inputs = mlstm_inputs(T, H, K, V)
    out, final = m(**inputs)
    q, k, v = inputs["q"], inputs["k"] / math.sqrt(K), inputs["v"]
    C, n = q.new_zeros(B, H, K, V), q.new_zeros(B, H, K)
    for t in range(T):
        i_gate, f_gate = torch.exp(inputs["i_pre"][:, t]), torch.sigmoid(inputs["f_pre"][:, t])
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * torch.einsum(
            "bhk,bhv->bhkv", k[:, t], v[:, t])
        n = f_gate[..., None] * n + i_gate[..., None] * k[:, t]
        h = torch.einsum("bhkv,bhk->bhv", C, q[:, t]) / torch.clamp(
            (n * q[:, t]).sum(-1).abs(), min=1.0)[..., None]
        torch.testing.assert_close(out[:, t], h)
    scale = torch.exp(final["m"])
    torch.testing.assert_close(final["C"] * scale[..., None, None], C)
    torch.testing.assert_close(final["n"] * scale[..., None], n)


# ---- sLSTM ----------------------------------------------------------------------------------
SLSTM_PARAMS = ("Wz", "Wi", "Wf", "Wo", "Rz", "Ri", "Rf", "Ro", "bz", "bi", "bf", "bo")


def slstm_reference(cell):
    p = {name: getattr(cell, name) for name in SLSTM_PARAMS}

    def run(x, init):
        Bsz, T, H, _ = x.shape
        d = p["bz"].shape[0]
        if init:
            c, n, h, m = (init[s] for s in "cnhm")
        else:
            c, n, h, m = (x.new_zeros(Bsz, H, d) for _ in range(4))
        hs = []
        for t in range(T):
            def pre(g):
                return x[:, t] @ p["W" + g].T + h @ p["R" + g].T + p["b" + g]
            z, i_tilde, f_tilde, o = torch.tanh(pre("z")), pre("i"), pre("f"), torch.sigmoid(pre("o"))
            log_f = F.logsigmoid(f_tilde)  # sigmoid forget gate
            m_new = torch.maximum(log_f + m, i_tilde)
            i_gate, f_gate = torch.exp(i_tilde - m_new), torch.exp(log_f + m - m_new)
            c = f_gate * c + i_gate * z
            n = f_gate * n + i_gate
            h = o * c / n
            m = m_new
            hs.append(h)
        return stack_time(hs), {"c": c, "n": n, "h": h, "m": m}
    return run


@pytest.mark.parametrize("T,H,dims,with_init", [
    (T, H, dims, i) for T, H, dims, i in
    itertools.product((1, 7), (1, 2), ((3, 5), (2, 1)), (False, True))])
def test_slstm(T, H, dims, with_init):
    d_in, d = dims
    m = rcc.compile(stdlib("slstm.rnn"))(d_in=d_in, d=d).double()
    inputs = dict(x=leaf(B, T, H, d_in))
    init = None
    if with_init:  # a positive normaliser, as any reachable state has
        init = {"c": leaf(B, H, d), "n": leaf(B, H, d, fn=lambda t: t.abs() + 0.5),
                "h": leaf(B, H, d), "m": leaf(B, H, d)}
    params = [getattr(m, name) for name in SLSTM_PARAMS]
    assert_same(m, inputs, init, slstm_reference(m), params)


# ---- DeltaNet family ------------------------------------------------------------------------
def delta_step(S, k, v, beta):
    """One delta-rule step on [B, H, K, V]: S + k (beta (v - S^T k))^T."""
    retrieved = torch.einsum("bhkv,bhk->bhv", S, k)
    return S + torch.einsum("bhk,bhv->bhkv", k, beta[..., None] * (v - retrieved))


def read_out(S, q):
    return torch.einsum("bhkv,bhk->bhv", S, q / math.sqrt(q.shape[-1]))


def deltanet_reference(q, k, v, beta, init, g=None):
    S = init["S"] if init else q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1])
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            S = torch.exp(g[:, t])[..., None, None] * S  # gated delta rule: decay first
        S = delta_step(S, k[:, t], v[:, t], beta[:, t])
        outs.append(read_out(S, q[:, t]))
    return stack_time(outs), {"S": S}


def delta_inputs(T, H, K, V):
    return dict(q=leaf(B, T, H, K), k=unit_keys(B, T, H, K), v=leaf(B, T, H, V),
                beta=leaf(B, T, H, fn=torch.sigmoid))


@pytest.mark.parametrize("T,H,KV,with_init", CASES, ids=CASE_IDS)
def test_deltanet(T, H, KV, with_init):
    K, V = KV
    m = rcc.compile(stdlib("deltanet.rnn"))(K=K, V=V).double()
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(m, delta_inputs(T, H, K, V), init, deltanet_reference)


def test_deltanet_beta_one_stores_value_exactly():
    # Section 2.2: with beta = 1 and a unit-norm key, after the update S^T k = v.
    K, V, H = 4, 3, 2
    m = rcc.compile(stdlib("deltanet.rnn"))(K=K, V=V).double()
    k = F.normalize(torch.randn(B, 1, H, K, dtype=f64), dim=-1)
    v = torch.randn(B, 1, H, V, dtype=f64)
    S0 = torch.randn(B, H, K, V, dtype=f64)
    out, final = m(k * math.sqrt(K), k, v, torch.ones(B, 1, H, dtype=f64), initial_state={"S": S0})
    torch.testing.assert_close(torch.einsum("bhkv,bhk->bhv", final["S"], k[:, 0]), v[:, 0])
    # q = k * sqrt(K) reads back through the 1/sqrt(K) scale: the output is v as well
    torch.testing.assert_close(out, v)
    # the rest of the memory (directions orthogonal to k) is untouched
    u = torch.randn(B, H, K, dtype=f64)
    u = u - (u * k[:, 0]).sum(-1, keepdim=True) * k[:, 0]
    torch.testing.assert_close(torch.einsum("bhkv,bhk->bhv", final["S"], u),
                               torch.einsum("bhkv,bhk->bhv", S0, u))


@pytest.mark.parametrize("T,H,KV,with_init", CASES, ids=CASE_IDS)
def test_gated_deltanet(T, H, KV, with_init):
    K, V = KV
    m = rcc.compile(stdlib("gated_deltanet.rnn"))(K=K, V=V).double()
    inputs = delta_inputs(T, H, K, V)
    inputs["g"] = leaf(B, T, H, fn=F.logsigmoid)
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(m, inputs, init, deltanet_reference)


def deltaproduct_reference(q, k, v, beta, g, init):
    S = init["S"] if init else q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1])
    outs = []
    for t in range(q.shape[1]):
        S = torch.exp(g[:, t])[..., None, None] * S
        for j in range(k.shape[3]):  # n_h Householder steps per token
            S = delta_step(S, k[:, t, :, j], v[:, t, :, j], beta[:, t, :, j])
        outs.append(read_out(S, q[:, t]))
    return stack_time(outs), {"S": S}


@pytest.mark.parametrize("n_h", (1, 2, 3))
@pytest.mark.parametrize("T,H,KV,with_init", CASES, ids=CASE_IDS)
def test_deltaproduct(n_h, T, H, KV, with_init):
    K, V = KV
    Cell = rcc.compile(stdlib("deltaproduct.rnn"))
    m = Cell(K=K, V=V, n_h=n_h).double()
    # n_h sets a loop count: each value gets its own generated module, transparently
    assert type(m).STATIC_DIMS == {"n_h": n_h}
    inputs = dict(q=leaf(B, T, H, K), k=unit_keys(B, T, H, n_h, K), v=leaf(B, T, H, n_h, V),
                  beta=leaf(B, T, H, n_h, fn=lambda x: 2 * torch.sigmoid(x)),  # (0, 2)
                  g=leaf(B, T, H, fn=F.logsigmoid))
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(m, inputs, init, deltaproduct_reference)


def test_deltaproduct_default_and_reduction_to_deltanet():
    Cell = rcc.compile(stdlib("deltaproduct.rnn"))
    assert Cell(K=2, V=2).dims["n_h"] == 2
    # n_h = 1 with g = 0 is DeltaNet; with g it is Gated DeltaNet
    K, V, T, H = 3, 2, 5, 2
    product = Cell(K=K, V=V, n_h=1).double()
    inputs = delta_inputs(T, H, K, V)
    g = leaf(B, T, H, fn=F.logsigmoid)
    args = dict(q=inputs["q"], k=inputs["k"][..., None, :], v=inputs["v"][..., None, :],
                beta=inputs["beta"][..., None])
    out, _ = product(**args, g=torch.zeros_like(g))
    out_delta, _ = rcc.compile(stdlib("deltanet.rnn"))(K=K, V=V).double()(**inputs)
    torch.testing.assert_close(out, out_delta)
    out, _ = product(**args, g=g)
    out_gated, _ = rcc.compile(stdlib("gated_deltanet.rnn"))(K=K, V=V).double()(**inputs, g=g)
    torch.testing.assert_close(out, out_gated)


# ---- float32 --------------------------------------------------------------------------------
def _float32_cases():
    T, H = 5, 2
    sig, logsig = torch.sigmoid, F.logsigmoid
    return {
        "gla.rnn": (dict(K=3, V=2), dict(q=(T, H, 3), k=(T, H, 3), v=(T, H, 2), gk=(T, H, 3, logsig))),
        "retnet.rnn": (dict(H=H, K=3, V=2), dict(q=(T, H, 3), k=(T, H, 3), v=(T, H, 2))),
        "mamba.rnn": (dict(d=3, R=1, N=2), dict(x=(T, H, 3))),
        "mlstm.rnn": (dict(K=3, V=2), dict(q=(T, H, 3), k=(T, H, 3), v=(T, H, 2), i_pre=(T, H),
                                           f_pre=(T, H))),
        "slstm.rnn": (dict(d_in=3, d=2), dict(x=(T, H, 3))),
        "deltanet.rnn": (dict(K=3, V=2), dict(q=(T, H, 3), k=(T, H, 3), v=(T, H, 2), beta=(T, H, sig))),
        "gated_deltanet.rnn": (dict(K=3, V=2), dict(q=(T, H, 3), k=(T, H, 3), v=(T, H, 2),
                                                    beta=(T, H, sig), g=(T, H, logsig))),
        "deltaproduct.rnn": (dict(K=3, V=2, n_h=3), dict(q=(T, H, 3), k=(T, H, 3, 3), v=(T, H, 3, 2),
                                                         beta=(T, H, 3, sig), g=(T, H, logsig))),
    }


@pytest.mark.parametrize("name", sorted(_float32_cases()))
def test_float32_matches_float64(name):
    dims, shapes = _float32_cases()[name]
    m = rcc.compile(stdlib(name))(**dims)
    inputs = {}
    for key, spec in shapes.items():
        fn = spec[-1] if callable(spec[-1]) else (lambda x: x)
        size = spec[:-1] if callable(spec[-1]) else spec
        inputs[key] = fn(torch.randn(B, *size))
    if "k" in inputs and "beta" in inputs:
        inputs["k"] = F.normalize(inputs["k"], dim=-1)
    out32, final32 = m(**inputs)
    out64, final64 = m.double()(**{k: x.double() for k, x in inputs.items()})
    for a, b in zip(as_tuple(out32), as_tuple(out64)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    for s in final64:
        assert final32[s].dtype == torch.float32
        torch.testing.assert_close(final32[s], final64[s].float(), rtol=1e-4, atol=1e-5)
