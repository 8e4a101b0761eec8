"""Moving per-step values between the layouts of the parallel plans: time-major rows
[T * N, ...] (all steps folded into the batch axis), [T, N, ...] stacks, and [N, T, ...] results."""
from __future__ import annotations

import math

import torch


def time_major(v: torch.Tensor, T: int, rank: int) -> torch.Tensor:
    """Rows [T * N, *s] as [T, N, 1, ..., *s] with `rank` declared axes, so a value of lower rank
    broadcasts against a state's declared axes the way the cell wrote it."""
    steps = v.reshape(T, v.shape[0] // T, *v.shape[1:])
    missing = rank - (v.dim() - 1)
    return steps.reshape(T, steps.shape[1], *([1] * missing), *v.shape[1:]) if missing > 0 else steps


def previous_steps(states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """The state each step starts from, as rows [T * N, ...]: the initial one, then each step's
    result but the last."""
    return torch.cat([initial[None], states[:-1]]).flatten(0, 1)


def every_step(value: torch.Tensor, T: int) -> torch.Tensor:
    """A per-sequence value [N, ...] repeated for every step, as rows [T * N, ...]."""
    return value.expand(T, *value.shape).flatten(0, 1)


def batch_major(rows: torch.Tensor, T: int) -> torch.Tensor:
    """Rows [T * N, ...] as a result sequence [N, T, ...]."""
    return rows.reshape(T, rows.shape[0] // T, *rows.shape[1:]).transpose(0, 1)


def to_chunks(x: torch.Tensor, T: int, N: int, shape: tuple, heads: int) -> torch.Tensor:
    """A value broadcastable to [T, N, *shape] as the chunkwise kernels' [N * H, T, *rest], the
    first `heads` axes of `shape` (a state's leading axes) folded into the batch."""
    x = x.expand(T, N, *shape).movedim(0, 1 + heads)
    return x.reshape(-1, T, *shape[heads:])


def from_chunks(o: torch.Tensor, T: int, N: int, heads: tuple) -> torch.Tensor:
    """The kernels' [N * H, T, ...] back as rows [T * N, *heads, ...]."""
    o = o.reshape(N, *heads, T, *o.shape[2:]).movedim(1 + len(heads), 0)
    return o.flatten(0, 1)


def rows(x: torch.Tensor, lead: int) -> torch.Tensor:
    """x with its axes after the first `lead` flattened into one contiguous axis (a view when
    they already are)."""
    if x.dim() != lead + 1:
        x = x.reshape(*x.shape[:lead], -1)
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    return x


def check_built_for(what: str, rows_seq: int, rows_state: int, tensors, expected) -> None:
    """Refuse tensors that differ from what a compiled kernel was built for: it indexes them by
    its built sizes, unchecked (a param whose shape changed after construction would be read
    and written out of bounds). expected: (name, kind, shape) per tensor, kind "seq" (rows_seq
    rows of `shape`), "const" (exactly `shape`) or "state" (rows_state rows of `shape`)."""
    for t, (name, kind, shape) in zip(tensors, expected):
        size = math.prod(shape)
        ok = (tuple(t.shape) == tuple(shape) if kind == "const" else
              t.numel() == (rows_seq if kind == "seq" else rows_state) * size)
        if not ok:
            raise ValueError(f"{what}: '{name}' has shape {list(t.shape)}; the kernel was built for "
                             f"{list(shape)}" + ("" if kind == "const" else " per row")
                             + " (a param's shape changed after construction? build a new module "
                             "for new sizes)")
