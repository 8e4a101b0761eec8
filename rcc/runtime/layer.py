"""A cell as a token-mixing layer over a model dimension, in flash-linear-attention's layer
shape: projections of x [B, T, d_model] to the cell's inputs per head (each with its activation,
an optional low-rank projection and an optional short causal convolution), the cell over the
heads, then a per-head RMS norm with an optional SiLU output gate, and the output projection.

    Layer(GLA, d_model=256, num_heads=4, K=32, V=64,
          inputs={"gk": Feature("logsigmoid", divide=16, rank=16, bias=True)},
          output_gate="silu")

An input not named in `inputs` is a plain linear projection. rcc.runtime.layers builds the
stdlib's layers (GLA, Gated DeltaNet, an LSTM layer) from this one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_ACTIVATIONS = ("identity", "l2norm", "sigmoid", "silu", "logsigmoid", "mamba_gate")


class Feature(torch.nn.Module):
    """How one cell input is made from x: a projection (low-rank through `rank` when given, as
    fla's gate projections; `bias` on its last linear map), an optional depthwise causal
    convolution of width `conv` followed by
    SiLU (fla's ShortConvolution), then an activation, divided by `divide`:
    identity, l2norm (x / sqrt(sum x^2 + 1e-6), the language's l2norm), sigmoid, silu,
    logsigmoid, or mamba_gate (-exp(A_log) * softplus(x + dt_bias), per head: Mamba-2's and
    Gated DeltaNet's decay in log space)."""

    def __init__(self, activation="identity", divide=1.0, rank=None, conv=0, bias=False):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (choose from "
                             f"{', '.join(_ACTIVATIONS)})")
        self.activation, self.divide, self.rank, self.conv, self.bias = (
            activation, float(divide), rank, int(conv), bias)

    def build(self, d_model, heads, size):
        """Create the parameters for `heads` x `size` outputs (called by Layer)."""
        width = heads * size
        if self.rank:
            self.proj = torch.nn.Sequential(torch.nn.Linear(d_model, self.rank, bias=False),
                                            torch.nn.Linear(self.rank, width, bias=self.bias))
        else:
            self.proj = torch.nn.Linear(d_model, width, bias=self.bias)
        if self.conv:
            self.conv_weight = torch.nn.Parameter(torch.empty(width, 1, self.conv))
            torch.nn.init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))
        if self.activation == "mamba_gate":  # initialised as Mamba-2's (and fla's)
            self.A_log = torch.nn.Parameter(torch.log(torch.empty(heads).uniform_(0, 16)))
            dt = torch.exp(torch.rand(width) * (math.log(0.1) - math.log(0.001))
                           + math.log(0.001)).clamp(min=1e-4)
            self.dt_bias = torch.nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        self.heads, self.size = heads, size
        return self

    def forward(self, x, history=None):
        """x [B, T, d_model] -> ([B, T, heads, size], the convolution's window after x: the last
        conv - 1 projections [B, conv - 1, width], or None without a convolution). `history`: the
        window before x (zeros: a sequence's start)."""
        y = self.proj(x)
        if not self.conv:
            return self._activate(y), None
        history = self._history(history, y)
        full = torch.cat([history.to(y.dtype), y], 1)  # causal: step t sees t - conv + 1 .. t
        y = F.conv1d(full.transpose(1, 2), self.conv_weight, groups=y.shape[-1]).transpose(1, 2)
        return self._activate(F.silu(y)), full[:, full.shape[1] - (self.conv - 1):]

    def _history(self, history, y):
        """The window before x: zeros at a sequence's start, else checked [B, conv - 1, width]."""
        want = (y.shape[0], self.conv - 1, y.shape[-1])
        if history is None:
            return y.new_zeros(want)
        if not isinstance(history, torch.Tensor) or tuple(history.shape) != want:
            got = list(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
            raise ValueError(f"a convolution window is [B, conv - 1, width] = {list(want)}; got {got}")
        return history

    def step(self, x, history=None):
        """One step: x [B, d_model] -> ([B, heads, size], the convolution's window of the last
        conv - 1 projections [B, conv - 1, width], or None without a convolution)."""
        y = self.proj(x)
        if not self.conv:
            return self._activate(y[:, None])[:, 0], None
        history = self._history(history, y)
        window = torch.cat([history, y[:, None]], 1)  # oldest first, as the convolution reads
        y = F.silu(torch.einsum("bjw,wj->bw", window, self.conv_weight[:, 0]))
        return self._activate(y[:, None])[:, 0], window[:, 1:]

    def _activate(self, y):
        """Projections [B, T, width] -> the input [B, T, heads, size]."""
        y = y.view(*y.shape[:2], self.heads, self.size)
        if self.activation == "l2norm":
            y = y * torch.rsqrt((y * y).sum(-1, keepdim=True) + 1e-6)
        elif self.activation == "mamba_gate":
            dt = F.softplus(y + self.dt_bias.view(self.heads, self.size))
            y = -self.A_log.exp()[:, None] * dt
        elif self.activation != "identity":
            y = getattr(F, self.activation)(y)
        return y / self.divide if self.divide != 1.0 else y

    def extra_repr(self):
        return (f"{self.activation}" + (f", divide={self.divide:g}" if self.divide != 1 else "")
                + (f", rank={self.rank}" if self.rank else "")
                + (f", conv={self.conv}" if self.conv else ""))


class Layer(torch.nn.Module):
    """x [B, T, d_model] -> (y [B, T, d_model], final states), the cell run over num_heads heads
    (its dims per head). Calls take the cell's keywords (initial_state, cu_seqlens, ...). The
    final states hold each short convolution's window as "conv:<input>" [B, conv - 1, width],
    so a call continues from another's final state."""

    def __init__(self, cell, d_model, num_heads, inputs=None, output_gate=None, gate_rank=None,
                 norm=True, norm_eps=1e-5, **dims):
        super().__init__()
        inputs = dict(inputs or {})
        unknown = set(inputs) - set(cell.INPUTS)
        if unknown:
            raise ValueError(f"{cell.CELL} has no input {sorted(unknown)[0]!r} (inputs: "
                             f"{', '.join(cell.INPUTS)})")
        if len(cell.OUTPUTS) != 1:
            raise TypeError(f"a Layer's cell has one output; {cell.CELL} has {len(cell.OUTPUTS)}")
        self.cell = cell(**dims, num_heads=num_heads)
        self.d_model, self.num_heads = d_model, num_heads
        (out,) = self.cell.output_shapes
        self.head_out = math.prod(out)
        self.features = torch.nn.ModuleDict()
        for name in cell.INPUTS:
            feature = inputs.get(name) or Feature()
            self.features[name] = feature.build(d_model, num_heads,
                                                math.prod(self.cell.shapes[name]))
        self.norm_weight = torch.nn.Parameter(torch.ones(self.head_out)) if norm else None
        self.norm_eps = norm_eps
        # the output gate: None, "silu" (GLA's, Gated DeltaNet's) or "sigmoid" (KDA's), its
        # projection low-rank (with a bias, as fla's) through `gate_rank` when given
        if output_gate not in (None, "silu", "sigmoid"):
            raise ValueError(f"output_gate must be None, 'silu' or 'sigmoid', got {output_gate!r}")
        self.output_gate, width = output_gate, num_heads * self.head_out
        self.g_proj = None if output_gate is None else (
            torch.nn.Linear(d_model, width, bias=False) if not gate_rank else
            torch.nn.Sequential(torch.nn.Linear(d_model, gate_rank, bias=False),
                                torch.nn.Linear(gate_rank, width, bias=True)))
        self.o_proj = torch.nn.Linear(num_heads * self.head_out, d_model, bias=False)
        for m in self.modules():  # fla's layers' init of their projections
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight, gain=2 ** -2.5)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)

    def cell_inputs(self, x, cu_seqlens=None):
        """The cell's inputs [B, T, heads, *decl] made from x (with cu_seqlens, a short
        convolution runs over each packed sequence alone: it never reads across a boundary)."""
        return self._inputs_and_windows(x, cu_seqlens)[0]

    def _inputs_and_windows(self, x, cu_seqlens=None, windows=None):
        """(cell_inputs, each short convolution's window after x as "conv:<input>"). `windows`:
        those before x (a continued sequence); with cu_seqlens none is kept."""
        out, after = [], {}
        for n in self.cell.INPUTS:
            f = self.features[n]
            if f.conv and cu_seqlens is not None:
                bounds = [int(b) for b in cu_seqlens]
                y = torch.cat([f(x[:, a:b])[0] for a, b in zip(bounds, bounds[1:])], 1)
            else:
                y, window = f(x, (windows or {}).get("conv:" + n))
                if window is not None:
                    after["conv:" + n] = window
            out.append(y.view(*x.shape[:2], self.num_heads, *self.cell.shapes[n]))
        return out, after

    def forward(self, x, initial_state=None, output_final_state=True, **kwargs):
        """x [B, T, d_model] -> (y [B, T, d_model], the final state: the cell's states and each
        short convolution's window of recent projections as "conv:<input>", what step() keeps
        too, so a call continues from another's final state; with lengths= or cu_seqlens= the
        windows are not kept: the sequences end at different steps)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Layer takes x [B, T, {self.d_model}] (variable lengths as lengths= "
                            f"or cu_seqlens=), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Layer takes x [B, T, {self.d_model}], got {list(x.shape)}")
        given = dict(initial_state) if isinstance(initial_state, dict) else None
        windows = {k: given.pop(k) for k in list(given) if k.startswith("conv:")} if given else {}
        convs = [f"conv:{n}" for n in self.cell.INPUTS if self.features[n].conv]
        unknown = sorted(set(windows) - set(convs))
        if unknown:
            raise ValueError(f"initial_state has convolution windows {unknown} of no input's short "
                             f"convolution (windows: {', '.join(convs) or 'none'})")
        if windows and kwargs.get("cu_seqlens") is not None:
            raise ValueError("with cu_seqlens each packed sequence starts its convolutions from "
                             "zeros: initial_state may not hold convolution windows (conv:*)")
        inputs, after = self._inputs_and_windows(x, kwargs.get("cu_seqlens"), windows)
        o, final = self.cell(*inputs, initial_state=initial_state if given is None else given,
                             output_final_state=output_final_state, **kwargs)
        if final is not None and kwargs.get("lengths") is None:  # padded rows end elsewhere
            final = {**final, **after}
        return self.output(x, o), final

    def output(self, x, o):
        """The layer's output from x and the cell's output o [B, T, heads, *out]."""
        o = o.reshape(*o.shape[:3], self.head_out)
        if self.norm_weight is not None:  # RMS norm per head
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight
        if self.g_proj is not None:
            o = o * getattr(F, self.output_gate)(self.g_proj(x).view_as(o))
        return self.o_proj(o.flatten(2))

    def step(self, x, cache=None):
        """One token: x [B, d_model] -> (y [B, d_model], the next Cache: the cell's states and
        each short convolution's window of recent projections, as "conv:<input>")."""
        from .generation import Cache
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be the Cache a previous step returned (or None), got "
                            f"{type(cache).__name__}")
        states = {} if cache is None else cache.states
        inputs, windows = [], {}
        for name in self.cell.INPUTS:
            y, window = self.features[name].step(x, states.get("conv:" + name))
            inputs.append(y.view(x.shape[0], self.num_heads, *self.cell.shapes[name]))
            if window is not None:
                windows["conv:" + name] = window
        cell_cache = None if cache is None else Cache(
            {k: v for k, v in states.items() if not k.startswith("conv:")}, cache.steps)
        o, cell_cache = self.cell.step(*inputs, cache=cell_cache)
        y = self.output(x[:, None], o[:, None])[:, 0]
        return y, Cache({**cell_cache.states, **windows}, cell_cache.steps)
