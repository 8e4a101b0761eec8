"""Stacks of a cell, as torch.nn.LSTM stacks its cell: layers, both directions, dropout between
layers, either batch layout.

    Stack(LSTM, num_layers=3, bidirectional=True, dropout=0.1, d_in=16, d=32)

Layer 0 is the cell with the dims given; each later layer reads the layer below's output (both
directions' side by side on the last axis), so its input dim (`input_dim`, "d_in" by default) is
that output's size. The reverse direction runs the cell over the time-reversed sequence and
reverses its output back, as torch.nn.LSTM's does. Final states come in torch.nn.LSTM's layout:
[num_layers * num_directions, B, *decl] per state, layer-major, forward before reverse.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .module import states_by_name


def _reverse_within(lengths, T, device):
    """Per row, the time index that reverses its first lengths[b] steps (the padding stays)."""
    t = torch.arange(T)
    rev = lengths[:, None] - 1 - t[None]
    return torch.where(rev >= 0, rev, t[None]).to(device)


def _reverse_packed(bounds, device):
    """The time index that reverses each packed sequence bounds[i]:bounds[i + 1] in place."""
    t = torch.arange(bounds[-1])
    for start, end in zip(bounds, bounds[1:]):
        t[start:end] = torch.arange(end - 1, start - 1, -1)
    return t[None].to(device)


def _reversed(x, flip):
    """x [B, T, ...] reversed in time: whole rows, or each row within its length (`flip`)."""
    if flip is None:
        return x.flip(1)
    index = flip.view(*flip.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class Stack(torch.nn.Module):
    """Layers of a one-input, one-output cell, as torch.nn.LSTM stacks its cell: each layer
    reads the one below's output (both directions' side by side); dropout between layers in
    training. Calls take a padded batch (with lengths=), a PackedSequence, or sequences packed
    along time (cu_seqlens=); final states are [num_layers * num_directions, B, *decl]."""

    def __init__(self, cell, num_layers=1, bidirectional=False, dropout=0.0, batch_first=True,
                 input_dim="d_in", **dims):
        super().__init__()
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability, got {dropout!r}")
        if len(cell.INPUTS) != 1 or len(cell.OUTPUTS) != 1:
            raise TypeError(f"Stack stacks a cell with one input and one output; {cell.CELL} has "
                            f"inputs {list(cell.INPUTS)} and outputs {list(cell.OUTPUTS)}")
        names = [n for n, _, _ in cell.DIMS]
        if num_layers > 1 and input_dim not in names:
            raise TypeError(f"{cell.CELL} has no dim {input_dim!r} to size the layers above the "
                            f"first (dims: {', '.join(names)}): pass input_dim=")
        self.num_layers, self.bidirectional, self.dropout = num_layers, bidirectional, dropout
        self.batch_first, self.directions = batch_first, 2 if bidirectional else 1
        self.cells = torch.nn.ModuleList()
        for layer in range(num_layers):
            for _ in range(self.directions):
                self.cells.append(cell(**dims))
            out = self.cells[-1].output_shapes[0]
            if len(out) != 1:
                raise TypeError(f"Stack needs a vector output to feed the next layer; "
                                f"{cell.CELL}'s is {list(out)}")
            dims = {**dims, input_dim: out[0] * self.directions}
        self.states = cell.STATES

    def cell(self, layer, reverse=False):
        """The cell module of `layer` (and direction)."""
        return self.cells[layer * self.directions + int(reverse)]

    def forward(self, x, initial_state=None, lengths=None, cu_seqlens=None):
        """x: [B, T, d_in] ([T, B, d_in] with batch_first=False), or a PackedSequence.
        initial_state: {state: [num_layers * num_directions, B, *decl]} or None. lengths: each
        row's length in a padded x (the reverse direction then starts at each row's own end).
        cu_seqlens: x holds sequences packed along time into a batch of one, sequence i at
        cu_seqlens[i]:cu_seqlens[i + 1] (flash-linear-attention's layout); B is then the number
        of sequences for initial and final states. Returns (output [B, T, directions * out], or
        a PackedSequence for one; final states in the same layout as initial_state, each row's
        at its own length)."""
        if isinstance(x, PackedSequence):
            if lengths is not None or cu_seqlens is not None:
                raise TypeError("a PackedSequence carries its lengths: pass no lengths= or cu_seqlens=")
            padded, lens = pad_packed_sequence(x, batch_first=self.batch_first)
            y, final = self.forward(padded, initial_state, lens)
            return pack_padded_sequence(y, lens, batch_first=self.batch_first,
                                        enforce_sorted=False), final
        if lengths is not None and cu_seqlens is not None:
            raise TypeError("pass lengths= (a padded batch) or cu_seqlens= (a packed one), not both")
        if not self.batch_first:
            x = x.transpose(0, 1)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
            kwargs = {"lengths": lengths.tolist()}
            flip = _reverse_within(lengths, x.shape[1], x.device)
        elif cu_seqlens is not None:
            from .varlen import _bounds
            bounds = _bounds(cu_seqlens, x.shape[1])  # checked as a cell's call checks them
            kwargs = {"cu_seqlens": bounds}
            flip = _reverse_packed(bounds, x.device) if self.bidirectional else None
        else:
            kwargs, flip = {}, None
        initial_state = states_by_name(initial_state, self.states, "the cell")  # GRU's h_0 too
        if initial_state is not None:
            unknown = set(initial_state) - set(self.states)
            if unknown:
                raise ValueError(f"initial_state has unknown states {sorted(unknown)} "
                                 f"(states: {', '.join(self.states)})")
            rows = self.num_layers * self.directions
            for name, s in initial_state.items():
                if not isinstance(s, torch.Tensor) or s.dim() < 2 or s.shape[0] != rows:
                    got = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                    raise ValueError(f"initial state {name!r} has shape {got}; a Stack of "
                                     f"{self.num_layers} layers x {self.directions} directions "
                                     f"takes [{rows}, B, ...]")
        finals = {name: [] for name in self.states}
        for layer in range(self.num_layers):
            outs = []
            for reverse in ((False, True) if self.bidirectional else (False,)):
                k = layer * self.directions + int(reverse)
                start = None if initial_state is None else \
                    {name: s[k] for name, s in initial_state.items()}
                seq = _reversed(x, flip) if reverse else x
                y, final = self.cells[k](seq, initial_state=start, **kwargs)
                outs.append(_reversed(y, flip) if reverse else y)
                for name in self.states:
                    finals[name].append(final[name])
            x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return x, {name: torch.stack(v) for name, v in finals.items()}

    def step(self, x, cache=None):
        """One step of generation: x [B, d_in] (no time axis); `cache` the Cache the last step
        returned (None: the cells' declared initial states). Returns (output [B, out], the next
        Cache). A bidirectional stack has no step: its reverse direction reads the future."""
        from .generation import step
        if self.bidirectional:
            raise TypeError("a bidirectional Stack cannot run one step at a time (its reverse "
                            "direction starts from the sequence's end)")
        return step(self, (x,), {}, cache, batch_axis=1, time_axis=1 if self.batch_first else 0)

    def extra_repr(self):
        return (f"num_layers={self.num_layers}, bidirectional={self.bidirectional}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")
