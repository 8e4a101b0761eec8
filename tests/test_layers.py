"""rcc.Layer and the stdlib layers (issue 19): each equals its math written out by hand from
the papers and flash-linear-attention's layer definitions, with the same weights, forward and
backward; one token at a time equals the full sequence."""
import pytest
import torch
import torch.nn.functional as F

import rcc
from conftest import stdlib


def rms_gate(o, weight, gate, eps=1e-5):
    """fla's FusedRMSNormGated with SiLU: rmsnorm(o) * weight * silu(gate), per head."""
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * weight * F.silu(gate)


def gla_by_hand(layer, x):
    B, T, _ = x.shape
    H, f = layer.num_heads, layer.features
    q = (x @ f["q"].proj.weight.T).view(B, T, H, -1)
    k = (x @ f["k"].proj.weight.T).view(B, T, H, -1)
    v = (x @ f["v"].proj.weight.T).view(B, T, H, -1)
    low, up = f["gk"].proj  # fla's gk_proj: rank 16, a bias on the second map
    gk = F.logsigmoid((x @ low.weight.T) @ up.weight.T + up.bias).view(B, T, H, -1) / 16
    K = q.shape[-1]
    S = x.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):  # S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_t^T; o_t = S_t^T q_t / sqrt(K)
        S = gk[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    o = torch.stack(outs, 1)
    g = (x @ layer.g_proj.weight.T).view_as(o)
    return rms_gate(o, layer.norm_weight, g).flatten(2) @ layer.o_proj.weight.T


def causal_conv_silu(y, weight):
    w = weight.shape[-1]
    return F.silu(F.conv1d(F.pad(y.transpose(1, 2), (w - 1, 0)), weight,
                           groups=y.shape[-1]).transpose(1, 2))


def delta_rule_qkv(layer, x):
    """q, k, v of the delta-rule layers: short convolutions with SiLU, q and k L2-normalised."""
    B, T, _ = x.shape
    f = layer.features

    def conv_proj(name):
        y = causal_conv_silu(x @ f[name].proj.weight.T, f[name].conv_weight)
        return y.view(B, T, layer.num_heads, -1)

    def l2norm(y):
        return y / (y * y).sum(-1, keepdim=True).add(1e-6).sqrt()

    return l2norm(conv_proj("q")), l2norm(conv_proj("k")), conv_proj("v")


def gated_deltanet_by_hand(layer, x):
    B, T, _ = x.shape
    H, f = layer.num_heads, layer.features
    q, k, v = delta_rule_qkv(layer, x)
    beta = torch.sigmoid(x @ f["beta"].proj.weight.T)  # [B, T, H]
    a = x @ f["g"].proj.weight.T
    g = -f["g"].A_log.exp() * F.softplus(a + f["g"].dt_bias)  # [B, T, H]
    K = q.shape[-1]
    S = x.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):  # the gated delta rule, Yang et al. 2024 eq. (10)
        S = g[:, t].exp()[..., None, None] * S
        kS = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + k[:, t, ..., None] * (beta[:, t, :, None] * (v[:, t] - kS))[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    o = torch.stack(outs, 1)
    gate = (x @ layer.g_proj.weight.T).view_as(o)
    return rms_gate(o, layer.norm_weight, gate).flatten(2) @ layer.o_proj.weight.T


def check_equal(layer, by_hand, T=9):
    torch.manual_seed(1)
    x = torch.randn(2, T, layer.d_model, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    want = by_hand(layer, x)
    torch.testing.assert_close(y, want)
    params = list(layer.parameters())
    got = torch.autograd.grad(y.sin().sum(), [x, *params], allow_unused=True)
    ref = torch.autograd.grad(want.sin().sum(), [x, *params], allow_unused=True)
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], got, ref):
        if b is None:
            assert a is None or not a.abs().any(), name
        else:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("backend, plan", [("torch", "sequential"), ("torch", "chunk"),
                                           ("cpp", "sequential")])
def test_gla_layer_is_its_math(backend, plan):
    torch.manual_seed(0)
    layer = rcc.layers.gla(24, num_heads=3, backend=backend, plan=plan).double()
    with torch.no_grad():
        layer.norm_weight.uniform_(0.5, 1.5)
    check_equal(layer, gla_by_hand)


@pytest.mark.parametrize("backend, plan", [("torch", "sequential"), ("torch", "chunk")])
def test_gated_deltanet_layer_is_its_math(backend, plan):
    torch.manual_seed(0)
    layer = rcc.layers.gated_deltanet(16, num_heads=2, head_dim=8, backend=backend, plan=plan).double()
    check_equal(layer, gated_deltanet_by_hand)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lstm_and_gru_layers_are_torch_between_projections(kind):
    torch.manual_seed(0)
    layer = getattr(rcc.layers, kind)(12, 8).double()
    ref = getattr(torch.nn, kind.upper())(12, 8, batch_first=True).double()
    rcc.from_torch(layer.cell, ref)
    x = torch.randn(2, 9, 12, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    want = ref(x @ layer.features["x"].proj.weight.T)[0] @ layer.o_proj.weight.T
    torch.testing.assert_close(y, want)
    cell = list(layer.cell.parameters())
    got = torch.autograd.grad(y.sin().sum(), [x, *cell])
    ref_grads = torch.autograd.grad(want.sin().sum(), [x, *ref.parameters()])
    for a, b in zip(got, ref_grads):  # torch's parameter order: weight_ih, weight_hh, biases
        torch.testing.assert_close(a, b)


def test_a_layer_steps_one_token_at_a_time_and_takes_cu_seqlens():
    torch.manual_seed(0)
    layer = rcc.layers.gla(24, num_heads=3).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    y, final = layer(x)
    cache = None
    for t in range(7):
        y_t, cache = layer.step(x[:, t], cache)
        torch.testing.assert_close(y_t, y[:, t])
    torch.testing.assert_close(cache.states["S"], final["S"])
    packed, _ = layer(torch.cat([x[0], x[1, :3]])[None], cu_seqlens=[0, 7, 10])
    torch.testing.assert_close(packed[0, :7], y[0])
    torch.testing.assert_close(packed[0, 7:], layer(x[1:, :3])[0][0])


def test_a_layer_with_short_convolutions_steps_one_token_at_a_time():
    torch.manual_seed(0)
    layer = rcc.layers.gated_deltanet(16, num_heads=2, head_dim=8).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y, final = layer(x)
    cache = None
    for t in range(7):
        y_t, cache = layer.step(x[:, t], cache)
        torch.testing.assert_close(y_t, y[:, t])
    torch.testing.assert_close(cache.states["S"], final["S"])
    assert cache.states["conv:q"].shape == (2, 3, 16) and cache.steps == 7
    # packed sequences: the convolutions do not read across a boundary either
    packed, _ = layer(torch.cat([x[0], x[1, :3]])[None], cu_seqlens=torch.tensor([0, 7, 10]))
    torch.testing.assert_close(packed[0, :7], y[0])
    torch.testing.assert_close(packed[0, 7:], layer(x[1:, :3])[0][0])


def test_layer_errors():
    gdn = rcc.layers.gated_deltanet(16, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"Layer takes x \[B, T, 16\]"):
        gdn(torch.randn(2, 5, 8))
    gla = rcc.compile(stdlib("gla.rnn"))
    with pytest.raises(ValueError, match="GLA has no input 'z'"):
        rcc.Layer(gla, 16, 2, {"z": rcc.Feature()}, K=4, V=4)
    with pytest.raises(ValueError, match="output_gate must be None, 'silu' or 'sigmoid'"):
        rcc.Layer(gla, 16, 2, output_gate="tanh", K=4, V=4)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        rcc.Feature("tanh")


def test_the_layers_recurrences_equal_fla_naive_references():
    """The cell inside each stdlib layer against flash-linear-attention's pure-torch reference of
    the same recurrence (fla.ops.*.naive, float32), on the layer's own inputs."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla

    torch.manual_seed(0)
    x = torch.randn(2, 11, 32)
    gla = rcc.layers.gla(32, num_heads=2)
    q, k, v, gk = gla.cell_inputs(x)
    want = gla.output(x, naive_recurrent_gla(q, k, v, gk)[0])
    torch.testing.assert_close(gla(x)[0], want, rtol=1e-5, atol=1e-6)
    gdn = rcc.layers.gated_deltanet(32, num_heads=2, head_dim=8)
    q, k, v, beta, g = gdn.cell_inputs(x)
    want = gdn.output(x, naive_recurrent_gated_delta_rule(q, k, v, beta, g)[0])
    torch.testing.assert_close(gdn(x)[0], want, rtol=1e-5, atol=1e-6)


def kda_by_hand(layer, x):
    """fla.layers.KimiDeltaAttention's math: short convs with SiLU, l2norm q and k in the
    kernel, per-channel gate -exp(A_log) * softplus(f_proj(x) + dt_bias), beta = sigmoid, the
    delta rule with a diagonal decay, then rmsnorm(o) * w * sigmoid(g_proj(x)) and o_proj."""
    B, T, _ = x.shape
    H, f = layer.num_heads, layer.features
    q, k, v = delta_rule_qkv(layer, x)
    beta = torch.sigmoid(x @ f["beta"].proj.weight.T)
    low, up = f["g"].proj
    fx = ((x @ low.weight.T) @ up.weight.T).view(B, T, H, -1)
    g = -f["g"].A_log.exp()[:, None] * F.softplus(fx + f["g"].dt_bias.view(H, -1))
    K = q.shape[-1]
    S = x.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        S = g[:, t].exp()[..., None] * S
        kS = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + k[:, t, ..., None] * (beta[:, t, :, None] * (v[:, t] - kS))[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    o = torch.stack(outs, 1)
    g_low, g_up = layer.g_proj
    gate = ((x @ g_low.weight.T) @ g_up.weight.T + g_up.bias).view_as(o)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight
    return (o * torch.sigmoid(gate)).flatten(2) @ layer.o_proj.weight.T


@pytest.mark.parametrize("backend, plan", [("torch", "sequential"), ("torch", "chunk")])
def test_kda_layer_is_its_math(backend, plan):
    torch.manual_seed(0)
    layer = rcc.layers.kda(16, num_heads=2, head_dim=8, backend=backend, plan=plan).double()
    with torch.no_grad():
        layer.g_proj[1].bias.uniform_(-1, 1)
    check_equal(layer, kda_by_hand)


def test_kda_layer_recurrence_equals_fla_naive():
    from fla.ops.kda.naive import naive_recurrent_kda

    torch.manual_seed(0)
    x = torch.randn(2, 11, 32)
    layer = rcc.layers.kda(32, num_heads=2, head_dim=8)
    q, k, v, g, beta = layer.cell_inputs(x)
    want = layer.output(x, naive_recurrent_kda(q, k, v, g, beta)[0])
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", ["gated_deltanet", "kda"])
def test_a_layer_with_short_convolutions_continues_from_a_final_state(make):
    """forward's final state holds each convolution's window (as step's cache does), so a prompt
    prefilled by one call continues by step() or by another call exactly."""
    torch.manual_seed(0)
    layer = getattr(rcc.layers, make)(d_model=16, num_heads=2, head_dim=8).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, final = layer(x)
    assert {k for k in final if k.startswith("conv:")} == {"conv:q", "conv:k", "conv:v"}
    for cut in (1, 5):
        _, prefix = layer(x[:, :cut])
        y_step, _ = layer.step(x[:, cut], cache=rcc.Cache(prefix, cut))
        torch.testing.assert_close(y_step, y[:, cut])
        y_rest, final_rest = layer(x[:, cut:], initial_state=prefix)
        torch.testing.assert_close(y_rest, y[:, cut:])
        for name in final:
            torch.testing.assert_close(final_rest[name], final[name])
    with pytest.raises(ValueError, match="of no input's short convolution"):
        layer(x, initial_state={**final, "conv:beta": torch.zeros(2, 3, 2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"a convolution window is \[B, conv - 1, width\]"):
        layer(x, initial_state={**final, "conv:q": final["conv:q"][:1]})
