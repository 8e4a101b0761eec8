"""The stdlib's token-mixing layers (rcc.runtime.layer.Layer over a stdlib cell), in
flash-linear-attention's layer shapes and defaults.

    layer = rcc.layers.gla(d_model=512, num_heads=4)
    y, final = layer(x)                       # x [B, T, 512]
"""
from __future__ import annotations


from .runtime.layer import Feature, Layer



def _cell(name, backend, plan):
    from importlib.resources import files

    from .api import compile as compile_cell
    return compile_cell(str(files("rcc.stdlib") / f"{name}.rnn"), backend=backend, plan=plan)


def gla(d_model, num_heads=4, expand_k=0.5, expand_v=1.0, gate_low_rank_dim=16,
        gate_logit_normalizer=16, backend="auto", plan="auto"):
    """Gated Linear Attention (Yang et al. 2023) as fla.layers.GatedLinearAttention: q, k, v
    projections, the forget gate through a rank-16 projection, logsigmoid / 16 (log space),
    the SiLU-gated RMS norm of the output and the output projection."""
    K, V = int(d_model * expand_k) // num_heads, int(d_model * expand_v) // num_heads
    gate = Feature("logsigmoid", divide=gate_logit_normalizer, rank=gate_low_rank_dim, bias=True)
    return Layer(_cell("gla", backend, plan), d_model, num_heads, {"gk": gate},
                 output_gate="silu", K=K, V=V)


def gated_deltanet(d_model, num_heads=6, head_dim=256, expand_v=2.0, conv_size=4,
                   backend="auto", plan="auto"):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024) as fla.layers.GatedDeltaNet: q, k, v
    through short causal convolutions with SiLU, q and k L2-normalised, beta = sigmoid, the
    decay Mamba-2's -exp(A_log) * softplus(a + dt_bias) per head, the SiLU-gated RMS norm of the
    output and the output projection."""
    K, V = head_dim, int(head_dim * expand_v)
    conv = {"conv": conv_size} if conv_size else {}
    inputs = {"q": Feature("l2norm", **conv), "k": Feature("l2norm", **conv),
              "v": Feature("identity", **conv), "beta": Feature("sigmoid"),
              "g": Feature("mamba_gate")}
    return Layer(_cell("gated_deltanet", backend, plan), d_model, num_heads, inputs,
                 output_gate="silu", K=K, V=V)


def kda(d_model, num_heads=16, head_dim=128, expand_v=1.0, conv_size=4, backend="auto",
        plan="auto"):
    """Kimi Delta Attention (Kimi Linear, 2025) as fla.layers.KimiDeltaAttention: q, k, v
    through short causal convolutions with SiLU, q and k L2-normalised, beta = sigmoid, the
    per-channel decay -exp(A_log) * softplus(f + dt_bias) with f through a rank-head_v_dim
    projection, the sigmoid-gated RMS norm of the output (its gate low-rank too) and the output
    projection."""
    K, V = head_dim, int(head_dim * expand_v)
    conv = {"conv": conv_size} if conv_size else {}
    inputs = {"q": Feature("l2norm", **conv), "k": Feature("l2norm", **conv),
              "v": Feature("identity", **conv), "beta": Feature("sigmoid"),
              "g": Feature("mamba_gate", rank=V)}
    return Layer(_cell("kda", backend, plan), d_model, num_heads, inputs,
                 output_gate="sigmoid", gate_rank=V, K=K, V=V)


def lstm(d_model, hidden, backend="auto", plan="auto"):
    """An LSTM as a token-mixing layer: x projected to the cell's input, the LSTM (one head),
    its output projected back to d_model (no norm, no gate)."""
    return Layer(_cell("lstm", backend, plan), d_model, 1, norm=False, d_in=d_model, d=hidden)


def gru(d_model, hidden, backend="auto", plan="auto"):
    """A GRU as a token-mixing layer, as `lstm` (torch.nn.GRU's equations, stdlib/gru.rnn)."""
    return Layer(_cell("gru", backend, plan), d_model, 1, norm=False, d_in=d_model, d=hidden)
