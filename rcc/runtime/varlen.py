"""Variable-length batches: several sequences, each from its own initial state to its own final
state, on any plan and backend.

Three spellings of one thing:
- `cu_seqlens` (flash-linear-attention's): the sequences packed along time into a batch of one,
  [1, total, *heads, *decl], sequence i at cu_seqlens[i]:cu_seqlens[i + 1];
- `lengths` (torch.nn.utils.rnn's padded form): a batch [B, T, ...] whose row b is a sequence of
  lengths[b] steps (the rest is padding, never read; its outputs are zeros);
- a torch.nn.utils.rnn.PackedSequence per input (the outputs come back packed).

They run as cuDNN runs a PackedSequence: the sequences still running between two consecutive
lengths make one batch, which the module runs over those steps from the states the previous
batch ended in. So a plan's parallel form (scan, chunk, Newton) runs within each stretch and no
state crosses a sequence boundary; there are as many calls as distinct lengths.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def is_packed(args, kwargs) -> bool:
    first = args[0] if args else next(iter(kwargs.values()), None)
    return isinstance(first, PackedSequence)


def call(module, args, kwargs, initial_state, output_final_state, cu_seqlens, lengths):
    """module(*args, **kwargs) over variable-length sequences (see the module docstring)."""
    given = module._bind_inputs(args, kwargs)
    if cu_seqlens is not None and lengths is not None:
        raise TypeError(f"{module.CELL}: pass cu_seqlens or lengths, not both")
    if cu_seqlens is not None:
        return _cu_seqlens(module, given, initial_state, output_final_state, cu_seqlens)
    packed = [isinstance(x, PackedSequence) for x in given.values()]
    if any(packed):
        if lengths is not None or not all(packed):
            raise TypeError(f"{module.CELL}: a PackedSequence for every input, or none "
                            "(with lengths= for a padded batch)")
        return _packed(module, given, initial_state, output_final_state)
    return _padded(module, given, initial_state, output_final_state, lengths)


def _steps(module, sequences, initial, output_final_state):
    """Run the sequences; `sequences`: per sequence, {input: [L_i, *heads, *decl]}; `initial`:
    per state, [S, *heads, *decl] or None. Returns (per output, per sequence [L_i, ...]; final
    states {name: [S, ...]} or None)."""
    S = len(sequences)
    lens = [next(iter(seq.values())).shape[0] for seq in sequences]
    names = list(module.INPUTS)
    states = {}  # state -> per sequence its current value [*heads, *decl] (after a first call)
    outs = [[[] for _ in range(S)] for _ in module.OUTPUTS]
    done = 0
    for end in sorted(set(lens)):
        active = [i for i in range(S) if lens[i] > done]
        if end > done:
            xs = [torch.stack([sequences[i][n][done:end] for i in active]) for n in names]
            start = None
            if states or initial is not None:
                start = {}
                for name in module.STATES:
                    if name in states:
                        start[name] = torch.stack([states[name][i] for i in active])
                    elif initial is not None and initial.get(name) is not None:
                        start[name] = initial[name][active]
            y, final = module(*xs, initial_state=start)
            ys = y if isinstance(y, tuple) else (y,)
            for k, v in enumerate(ys):
                for row, i in enumerate(active):
                    outs[k][i].append(v[row])
            for name in module.STATES:
                current = states.setdefault(name, [None] * S)
                for row, i in enumerate(active):
                    current[i] = final[name][row]
        done = end
    if not output_final_state:
        return outs, None
    return outs, {name: torch.stack(states[name]) for name in module.STATES}


def _result(module, outs, final):
    return (outs[0] if len(outs) == 1 else tuple(outs)), final


def _cu_seqlens(module, given, initial_state, output_final_state, cu_seqlens):
    first = next(iter(given.values()))
    for name, x in given.items():
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != 1:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"with cu_seqlens, input {name!r} must be the sequences packed into "
                             f"a batch of one, [1, total, ...]; got {got}")
    total = first.shape[1]
    bounds = _bounds(cu_seqlens, total)
    S = len(bounds) - 1
    sequences = [{n: x[0, bounds[i]:bounds[i + 1]] for n, x in given.items()} for i in range(S)]
    initial = _initial(module, initial_state, S, first, 2)
    outs, final = _steps(module, sequences, initial, output_final_state)
    # each sequence's stretches in time order, the sequences in order: packed again
    packed = [torch.cat([c for chunks in per_out for c in chunks])[None] for per_out in outs]
    return _result(module, packed, final)


def _bounds(cu_seqlens, total) -> list:
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} "
                             f"of shape {list(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
    else:
        bounds = list(cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(
            b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the packed length {total} "
                         f"(each sequence at least one step); got {bounds}")
    return bounds


def _initial(module, initial_state, S, first, lead):
    """initial_state as {state: [S, *heads, *decl]}, checked as a call's (one per sequence)."""
    if initial_state is None:
        return None
    heads = tuple(first.shape[lead:first.dim() - len(module.shapes[module.INPUTS[0]])])
    try:
        given = module._given_states(initial_state, (S, heads, None))
    except ValueError as e:
        raise ValueError(f"{e}: one per sequence") from None
    return {name: s for name, s in zip(module.STATES, given) if s is not None}


def _padded(module, given, initial_state, output_final_state, lengths):
    first = next(iter(given.values()))
    for name, x in given.items():
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[:2] != first.shape[:2]:
            raise ValueError(f"with lengths, the inputs are [B, T, ...] padded batches; input "
                             f"{name!r} does not match the first one's batch and time sizes")
    B, T = first.shape[0], first.shape[1]
    lens = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    if len(lens) != B or any(not isinstance(n, int) or n < 1 or n > T for n in lens):
        raise ValueError(f"lengths must give each of the {B} sequences a length from 1 to {T}; "
                         f"got {lens}")
    sequences = [{n: x[b, :lens[b]] for n, x in given.items()} for b in range(B)]
    initial = _initial(module, initial_state, B, first, 2)
    outs, final = _steps(module, sequences, initial, output_final_state)
    padded = []
    for per_out in outs:  # zeros past each length, to the batch's T
        y = torch.nn.utils.rnn.pad_sequence([torch.cat(c) for c in per_out], batch_first=True)
        if y.shape[1] < T:
            y = torch.cat([y, y.new_zeros(y.shape[0], T - y.shape[1], *y.shape[2:])], 1)
        padded.append(y)
    return _result(module, padded, final)


def _packed(module, given, initial_state, output_final_state):
    batch_sizes = None
    padded, lens = {}, None
    for name, p in given.items():
        if batch_sizes is None:
            batch_sizes = p.batch_sizes
        elif not torch.equal(p.batch_sizes, batch_sizes):
            raise ValueError(f"PackedSequence input {name!r} has other lengths than the first")
        padded[name], lens = pad_packed_sequence(p, batch_first=True)
    y, final = _padded(module, padded, initial_state, output_final_state, lens.tolist())
    ys = y if isinstance(y, tuple) else (y,)
    packed = [pack_padded_sequence(v, lens, batch_first=True, enforce_sorted=False) for v in ys]
    return _result(module, packed, final)
