"""KDA, RWKV-7, Comba, Mamba-2 and the LRU against loops of their papers' equations (written here
from the papers, float64, heads as an axis) and, where flash-linear-attention ships one, its naive
reference (`fla.ops.*.naive`, pure torch, run on CPU in float32). Plan sequential and the
parallel plan each is for: chunk (the diagonal-plus-rank-one form for the first three, gated
linear attention for Mamba-2) and scan (one block scan of the LRU's coupled re/im states)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import rcc
from conftest import stdlib
from test_stdlib_linear import assert_same, leaf, stack_time, unit_keys

B = 2
CASES = list(itertools.product((1, 7), (1, 2), ((3, 5), (4, 2)), (False, True), ("sequential", "chunk")))
IDS = [f"T{t}-H{h}-K{kv[0]}V{kv[1]}-{'init' if i else 'zero'}-{p}" for t, h, kv, i, p in CASES]


def _module(name, plan, **dims):
    m = rcc.compile(stdlib(name), plan=plan)(**dims).double()
    if plan == "chunk":
        m.chunk_size = 3  # T=7: two whole chunks and a part
    return m


def _zero_state(x, K, V):
    return x.new_zeros(x.shape[0], x.shape[2], K, V)


# ---- KDA (Kimi Linear, section 3.1) ---------------------------------------------------------
def kda_reference(q, k, v, g, beta, init):
    K, V = q.shape[-1], v.shape[-1]
    S = init["S"] if init else _zero_state(q, K, V)
    outs = []
    for t in range(q.shape[1]):
        alpha = g[:, t].exp()  # [B, H, K]
        kt, bt = k[:, t], beta[:, t][..., None, None]
        eye = torch.eye(K, dtype=q.dtype)
        householder = eye - bt * kt[..., :, None] * kt[..., None, :]  # I - beta k k^T
        S = householder @ (alpha[..., None] * S) + bt * kt[..., :, None] * v[:, t][..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] / math.sqrt(K)))
    return stack_time(outs), {"S": S}


@pytest.mark.parametrize("T,H,KV,with_init,plan", CASES, ids=IDS)
def test_kda(T, H, KV, with_init, plan):
    K, V = KV
    inputs = dict(q=leaf(B, T, H, K), k=unit_keys(B, T, H, K), v=leaf(B, T, H, V),
                  g=leaf(B, T, H, K, fn=F.logsigmoid), beta=leaf(B, T, H, fn=torch.sigmoid))
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(_module("kda.rnn", plan, K=K, V=V), inputs, init, kda_reference)


# ---- RWKV-7 (section 4, on a [K, V] state) --------------------------------------------------
def rwkv7_reference(r, log_w, k, v, kk, a, init):
    K, V = r.shape[-1], v.shape[-1]
    S = init["S"] if init else _zero_state(r, K, V)  # S^T of the paper's [V, K] state
    outs = []
    for t in range(r.shape[1]):
        # paper: S_t = S_{t-1} (diag(w) - kk^T (a * kk)) + v^T k, on [V, K]; transpose it
        S_paper = S.transpose(-1, -2)
        G = torch.diag_embed(log_w[:, t].exp()) - kk[:, t][..., :, None] * (a[:, t] * kk[:, t])[..., None, :]
        S_paper = S_paper @ G + v[:, t][..., :, None] * k[:, t][..., None, :]
        S = S_paper.transpose(-1, -2)
        outs.append(torch.einsum("bhvk,bhk->bhv", S_paper, r[:, t]))
    return stack_time(outs), {"S": S}


@pytest.mark.parametrize("T,H,KV,with_init,plan", CASES, ids=IDS)
def test_rwkv7(T, H, KV, with_init, plan):
    K, V = KV
    inputs = dict(r=leaf(B, T, H, K), log_w=leaf(B, T, H, K, fn=lambda x: -0.6 * torch.sigmoid(x)),
                  k=leaf(B, T, H, K), v=leaf(B, T, H, V), kk=unit_keys(B, T, H, K),
                  a=leaf(B, T, H, K, fn=torch.sigmoid))
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(_module("rwkv7.rnn", plan, K=K, V=V), inputs, init, rwkv7_reference)


# ---- RWKV-6 (section 4): a read of the previous state plus the bonus ----------------------
@pytest.mark.parametrize("T,H,KV,with_init,plan", CASES, ids=IDS)
def test_rwkv6(T, H, KV, with_init, plan):
    K, V = KV
    m = _module("rwkv6.rnn", plan, K=K, V=V)

    def reference(r, k, v, log_w, init):
        S = init["S"] if init else _zero_state(r, K, V)
        outs = []
        for t in range(r.shape[1]):
            kv = k[:, t][..., :, None] * v[:, t][..., None, :]
            outs.append(torch.einsum("bhkv,bhk->bhv", S + m.u[:, None] * kv, r[:, t]))
            S = log_w[:, t].exp()[..., None] * S + kv
        return stack_time(outs), {"S": S}

    inputs = dict(r=leaf(B, T, H, K), k=leaf(B, T, H, K), v=leaf(B, T, H, V),
                  log_w=leaf(B, T, H, K, fn=lambda x: -torch.exp(x)))
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(m, inputs, init, reference, params=(m.u,))


def test_rwkv6_matches_fla_naive():
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    T, H, K, V = 31, 2, 8, 6
    r, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    log_w = -torch.exp(torch.randn(B, T, H, K))
    m = rcc.compile(stdlib("rwkv6.rnn"), plan="chunk")(K=K, V=V)
    m.chunk_size = 16
    u = m.u.detach()
    # fla: [B, H, T, .], u per head [H, K], scale 1
    first = [x.transpose(1, 2) for x in (r, k, v, log_w)]
    o_ref, S_ref = naive_recurrent_rwkv6(*first, u.expand(H, K), scale=1.0, output_final_state=True)
    o, final = m(r, k, v, log_w)
    torch.testing.assert_close(o, o_ref.transpose(1, 2).to(o.dtype), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final["S"], S_ref.to(o.dtype), rtol=1e-4, atol=1e-4)


# ---- Comba (section 3) ------------------------------------------------------------------------
def comba_reference(q, k, v, p, beta, g, init):
    K, V = q.shape[-1], v.shape[-1]
    S = init["S"] if init else _zero_state(q, K, V)
    outs = []
    for t in range(q.shape[1]):
        S = g[:, t].exp()[..., None, None] * S
        delta = beta[:, t][..., None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, p[:, t]))
        S = S + k[:, t][..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] / math.sqrt(K)))
    return stack_time(outs), {"S": S}


@pytest.mark.parametrize("T,H,KV,with_init,plan", CASES, ids=IDS)
def test_comba(T, H, KV, with_init, plan):
    K, V = KV
    inputs = dict(q=leaf(B, T, H, K), k=unit_keys(B, T, H, K), v=leaf(B, T, H, V),
                  p=unit_keys(B, T, H, K), beta=leaf(B, T, H, fn=torch.sigmoid),
                  g=leaf(B, T, H, fn=F.logsigmoid))
    init = {"S": leaf(B, H, K, V)} if with_init else None
    assert_same(_module("comba.rnn", plan, K=K, V=V), inputs, init, comba_reference)


# ---- Mamba-2 (SSD, section 3) -----------------------------------------------------------------
@pytest.mark.parametrize("T,H,KV,with_init,plan", CASES, ids=IDS)
def test_mamba2(T, H, KV, with_init, plan):
    N, P = KV
    m = _module("mamba2.rnn", plan, N=N, P=P)
    with torch.no_grad():
        m.A_log.copy_(torch.tensor(0.3))
        m.D.copy_(torch.randn(P))

    def reference(x, B, C, dt, init):
        h = init["h"] if init else x.new_zeros(x.shape[0], x.shape[2], N, P)
        outs = []
        A = -torch.exp(m.A_log)
        for t in range(x.shape[1]):
            decay = torch.exp(dt[:, t] * A)[..., None, None]
            h = decay * h + B[:, t][..., :, None] * (dt[:, t][..., None] * x[:, t])[..., None, :]
            outs.append(torch.einsum("bhnp,bhn->bhp", h, C[:, t]) + m.D * x[:, t])
        return stack_time(outs), {"h": h}

    inputs = dict(x=leaf(B, T, H, P), B=leaf(B, T, H, N), C=leaf(B, T, H, N),
                  dt=leaf(B, T, H, fn=F.softplus))
    init = {"h": leaf(B, H, N, P)} if with_init else None
    assert_same(m, inputs, init, reference, params=(m.A_log, m.D))


# ---- LRU (section 3): a complex diagonal recurrence, in complex arithmetic ---------------------
@pytest.mark.parametrize("T,H,with_init,plan", list(itertools.product(
    (1, 9), (1, 2), (False, True), ("sequential", "scan"))))
def test_lru(T, H, with_init, plan):
    Hd, N = 3, 4
    m = _module("lru.rnn", plan, H=Hd, N=N)
    assert "scan" in rcc.analyze(stdlib("lru.rnn")).plans

    def reference(u, init):
        lam = torch.exp(-torch.exp(m.nu_log) + 1j * torch.exp(m.theta_log))
        gamma = torch.sqrt(1 - lam.abs() ** 2)
        Bc, Cc = torch.complex(m.B_re, m.B_im), torch.complex(m.C_re, m.C_im)
        x = torch.complex(init["x_re"], init["x_im"]) if init else \
            torch.zeros(u.shape[0], u.shape[2], N, dtype=torch.complex128)
        outs = []
        for t in range(u.shape[1]):
            x = lam * x + gamma * (u[:, t].to(torch.complex128) @ Bc.T)
            outs.append((x @ Cc.T).real + m.D * u[:, t])
        return stack_time(outs), {"x_re": x.real, "x_im": x.imag}

    inputs = dict(u=leaf(B, T, H, Hd))
    init = {"x_re": leaf(B, H, N), "x_im": leaf(B, H, N)} if with_init else None
    assert_same(m, inputs, init, reference, params=(m.nu_log, m.theta_log, m.B_re, m.C_im))


# ---- flash-linear-attention's naive references (float32, CPU) -------------------------------
# fla-core is in the test extra: these fail, not skip, where it is missing


@pytest.mark.parametrize("plan", ["sequential", "chunk"])
def test_kda_matches_fla_naive(plan):
    from fla.ops.kda.naive import naive_recurrent_kda

    T, H, K, V = 37, 2, 8, 6
    q, k, v = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1), torch.randn(B, T, H, V)
    g, beta, S0 = F.logsigmoid(torch.randn(B, T, H, K)), torch.rand(B, T, H), torch.randn(B, H, K, V)
    o_ref, S_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    m = rcc.compile(stdlib("kda.rnn"), plan=plan)(K=K, V=V)
    m.chunk_size = 16
    o, final = m(q, k, v, g, beta, initial_state={"S": S0})
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final["S"], S_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("plan", ["sequential", "chunk"])
def test_comba_matches_fla_naive(plan):
    from fla.ops.comba.naive import naive_recurrent_comba

    T, H, K, V = 29, 2, 8, 6
    q, k, p = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1), \
        F.normalize(torch.randn(B, T, H, K), dim=-1)
    v, beta, g = torch.randn(B, T, H, V), torch.rand(B, T, H), F.logsigmoid(torch.randn(B, T, H))
    o_ref, S_ref = naive_recurrent_comba(q, k, v, p, beta, g, output_final_state=True)
    m = rcc.compile(stdlib("comba.rnn"), plan=plan)(K=K, V=V)
    m.chunk_size = 16
    o, final = m(q, k, v, p, beta, g)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final["S"], S_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("plan", ["sequential", "chunk"])
def test_rwkv7_matches_fla_dplr_naive(plan):
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    T, H, K, V = 33, 2, 8, 6
    r, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    kk, a = F.normalize(torch.randn(B, T, H, K), dim=-1), torch.rand(B, T, H, K)
    log_w = -0.6 * torch.sigmoid(torch.randn(B, T, H, K))
    # fla's DPLR: S = S * exp(gk) + k v^T + beta (alpha^T S), queries scaled by K^-0.5, [B, H, T, .]
    heads_first = [x.transpose(1, 2) for x in (r * K ** 0.5, k, v, -kk, kk * a, log_w)]
    o_ref, S_ref = dplr_recurrence(*heads_first, output_final_state=True)
    m = rcc.compile(stdlib("rwkv7.rnn"), plan=plan)(K=K, V=V)
    m.chunk_size = 16
    o, final = m(r, log_w, k, v, kk, a)
    torch.testing.assert_close(o, o_ref.transpose(1, 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final["S"], S_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,plan,dims", [
    ("kda.rnn", "chunk", {"K": 16, "V": 16}), ("rwkv7.rnn", "chunk", {"K": 16, "V": 16}),
    ("comba.rnn", "chunk", {"K": 16, "V": 16}), ("rwkv6.rnn", "chunk", {"K": 16, "V": 16}),
    ("mamba2.rnn", "chunk", {"N": 16, "P": 8}), ("lru.rnn", "scan", {"H": 8, "N": 16}),
    ("linear_attention.rnn", "chunk", {"K": 16, "V": 16})])
def test_float32_at_length_4096(name, plan, dims):
    """Realistic decays over a long sequence: the parallel plan in float32 within 1e-4
    (relative) of plan sequential in float64."""
    from conftest import cell_inputs

    torch.manual_seed(0)
    ref = rcc.compile(stdlib(name), plan="sequential")(**dims).double()
    xs, init = cell_inputs(ref, 1, 4096, (), dtype=torch.float32)
    mod = rcc.compile(stdlib(name), plan=plan)(**dims)
    mod.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        want, _ = ref(*[x.double() for x in xs])
        got, _ = mod(*xs)
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-4, rel


PER_KEY_DELTAPRODUCT = """
cell GatedDeltaProductPerKey(K, V, n_h = 2) {
    input q[K], k[n_h, K], v[n_h, V], beta[n_h], gk[K]
    state S[K, V]
    memory = exp(gk)[:, None] * S
    for j in 0..n_h {
        memory = memory + outer(k[j], beta[j] * (v[j] - k[j] @ memory))
    }
    S' = memory
    output o = q @ S'
}
"""


@pytest.mark.parametrize("T", [1, 7])
def test_per_key_gated_deltaproduct_chunk(T):
    """DeltaProduct with a decay per key: two diagonal-plus-rank-one micro-steps a token (the
    gate merged into the first)."""
    from conftest import cell_inputs, run_with_grads

    from rcc.api import build_ir
    form = rcc.plans.chunk_form(build_ir(PER_KEY_DELTAPRODUCT)[0])
    assert form.kind == "dplr" and len(form.steps) == 2
    ref = rcc.compile(PER_KEY_DELTAPRODUCT, plan="sequential")(K=3, V=4).double()
    mod = rcc.compile(PER_KEY_DELTAPRODUCT, plan="chunk")(K=3, V=4).double()
    mod.chunk_size = 3
    xs, init = cell_inputs(ref, 2, T, (2,))
    want, want_grads = run_with_grads(ref, xs, init)
    got, got_grads = run_with_grads(mod, xs, init)
    for w, g in zip(want + list(want_grads), got + list(got_grads)):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["kda.rnn", "rwkv7.rnn", "comba.rnn"])
def test_explain_names_the_structure_and_plan(name):
    analysis = rcc.analyze(stdlib(name))
    assert "chunk" in analysis.plans
    assert "diagonal-plus-rank-one" in str(analysis)


def test_triton_plan_auto_runs_the_chunk_kernels():
    # the stabilised mLSTM (a max-plus scan first) and the diagonal-plus-rank-one form
    import sys
    for name in ("mlstm.rnn", "kda.rnn"):
        cls = rcc.compile(stdlib(name), backend="triton")
        assert "(backend triton, plan chunk)" in sys.modules[cls.__module__].__doc__


# ---- vector states folded into the matrix state's chunkwise form -----------------------------
NORMALISED = """
cell NormalisedLinearAttention(K, V) {
    input q[K], k[K], v[V], g
    state S[K, V], z[K]
    S' = exp(g) * S + outer(k, v)
    z' = exp(g) * z + k
    output o = (q @ S') / (dot(q, z') + 1.0)
}
"""


@pytest.mark.parametrize("T,with_init,backend", [(1, False, "torch"), (7, True, "torch"),
                                                 (9, True, "triton")])
def test_normaliser_folds_into_the_chunk_form(T, with_init, backend):
    K, V = 3, 4
    analysis = rcc.analyze(NORMALISED)
    assert "chunk" in analysis.plans
    m = rcc.compile(NORMALISED, plan="chunk", backend=backend)(K=K, V=V).double()
    m.chunk_size = 3

    def reference(q, k, v, g, init):
        S = init["S"] if init else q.new_zeros(q.shape[0], K, V)
        z = init["z"] if init else q.new_zeros(q.shape[0], K)
        outs = []
        for t in range(q.shape[1]):
            S = g[:, t].exp()[:, None, None] * S + k[:, t][:, :, None] * v[:, t][:, None, :]
            z = g[:, t].exp()[:, None] * z + k[:, t]
            outs.append(torch.einsum("bkv,bk->bv", S, q[:, t]) / ((q[:, t] * z).sum(-1, keepdim=True) + 1))
        return stack_time(outs), {"S": S, "z": z}

    inputs = dict(q=leaf(B, T, K, fn=torch.sigmoid), k=leaf(B, T, K, fn=torch.sigmoid),
                  v=leaf(B, T, V), g=leaf(B, T, fn=F.logsigmoid))
    init = {"S": leaf(B, K, V), "z": leaf(B, K, fn=torch.sigmoid)} if with_init else None
    assert_same(m, inputs, init, reference)


@pytest.mark.parametrize("z_update,output,why", [
    ("0.5 * z + k", "(q @ S') / (dot(q, z') + 1.0)", "as extra columns"),  # another decay
    ("exp(g) * z + q", "(q @ S') / (dot(q, z') + 1.0)", "does not fold"),  # another key
    ("exp(g) * z + k", "(q @ S') + z'[0:1]", "does not fold"),  # z' read otherwise
])
def test_states_that_do_not_fold_are_refused(z_update, output, why):
    src = NORMALISED.replace("exp(g) * z + k", z_update).replace(
        "(q @ S') / (dot(q, z') + 1.0)", output)
    assert "chunk" not in rcc.analyze(src).plans
    with pytest.raises(rcc.CompileError, match=why):
        rcc.compile(src, plan="chunk")


@pytest.mark.parametrize("plan", ["sequential", "chunk"])
def test_linear_attention_matches_fla_naive(plan):
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    T, H, K, V = 40, 2, 8, 6
    q, k = (F.elu(torch.randn(B, T, H, K)) + 1 for _ in range(2))
    v = torch.randn(B, T, H, V)
    o_ref, _ = naive_recurrent_linear_attn(q, k, v, scale=1.0, normalize=True)
    m = rcc.compile(stdlib("linear_attention.rnn"), plan=plan)(K=K, V=V)
    m.chunk_size = 16
    o, final = m(q, k, v)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final["z"], k.sum(1), rtol=1e-5, atol=1e-5)


# ---- the stabilised mLSTM: a max-plus scan, then the chunkwise form --------------------------
@pytest.mark.parametrize("T,heads,with_init,backend", [
    (1, (), False, "torch"), (9, (2,), True, "torch"), (70, (), True, "torch"),
    (1, (), True, "triton"), (70, (2,), True, "triton"), (130, (), False, "triton")])
def test_stabilised_mlstm_chunk_equals_sequential(T, heads, with_init, backend):
    """Backend triton: the max-plus scan's kernels (blocks of 32 steps), then the chunk
    kernels (chunks of 64): T = 70 and 130 cross both."""
    from conftest import cell_inputs, run_with_grads

    ref = rcc.compile(stdlib("mlstm.rnn"), plan="sequential")(K=3, V=4).double()
    mod = rcc.compile(stdlib("mlstm.rnn"), plan="chunk", backend=backend)(K=3, V=4).double()
    mod.chunk_size = 4
    xs, init = cell_inputs(ref, 2, T, heads)
    xs[3] = (xs[3] * 40).detach().requires_grad_()  # input gates up to e^100: the stabiliser matters
    want, want_grads = run_with_grads(ref, xs, init if with_init else {})
    got, got_grads = run_with_grads(mod, xs, init if with_init else {})
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    for w, g in zip(want_grads, got_grads):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


def test_stabilised_mlstm_float32_at_length_4096():
    from conftest import cell_inputs

    dims = {"K": 16, "V": 16}
    ref = rcc.compile(stdlib("mlstm.rnn"), plan="sequential")(**dims).double()
    xs, _ = cell_inputs(ref, 1, 4096, (), dtype=torch.float32)
    with torch.no_grad():
        want, final = ref(*[x.double() for x in xs])
        got, got_final = rcc.compile(stdlib("mlstm.rnn"), plan="chunk")(**dims)(*xs)
    assert (got.double() - want).norm() / want.norm() < 1e-4
    assert (got_final["m"].double() - final["m"]).abs().max() < 1e-3


@pytest.mark.parametrize("update,legal", [
    ("max(log_f + m, i_pre)", True), ("max(i_pre, m + log_f)", True),
    ("max(0.5 * m + log_f, i_pre)", False), ("max(log_f + m, i_pre + m)", False)])
def test_max_plus_states_are_recognised_exactly(update, legal):
    src = open(stdlib("mlstm.rnn")).read().replace("max(log_f + m, i_pre)", update)
    assert ("chunk" in rcc.analyze(src).plans) == legal
    if legal:
        x = [torch.randn(2, 6, *s, dtype=torch.float64) for s in ((3,), (3,), (4,), (), ())]
        ref = rcc.compile(src, plan="sequential")(K=3, V=4).double()
        mod = rcc.compile(src, plan="chunk")(K=3, V=4).double()
        mod.chunk_size = 4
        torch.testing.assert_close(mod(*x)[0], ref(*x)[0])


@pytest.mark.parametrize("plan", ["sequential", "chunk"])
def test_mamba2_matches_fla_simple_gla_naive(plan):
    """Mamba-2's SSD head is simple GLA with k = B, v = dt x, q = C, g = -exp(A_log) dt."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    T, H, N, P = 37, 2, 8, 6
    x, Bm, Cm = torch.randn(B, T, H, P), torch.randn(B, T, H, N), torch.randn(B, T, H, N)
    dt = F.softplus(torch.randn(B, T, H))
    m = rcc.compile(stdlib("mamba2.rnn"), plan=plan)(N=N, P=P)
    m.chunk_size = 16
    with torch.no_grad():
        m.A_log.fill_(0.2)
        g = -torch.exp(m.A_log) * dt
        o_ref, S_ref = naive_recurrent_simple_gla(Cm, Bm, dt[..., None] * x, g, scale=1.0)
        y, final = m(x, Bm, Cm, dt)
    torch.testing.assert_close(y, o_ref + m.D * x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final["h"], S_ref, rtol=1e-4, atol=1e-4)
