"""plan 'chunk' over grid2d: pLSTM's parallel form for cells whose states follow
    C_e = sum_{e' into u} T_u[slot(e), slot(e')] C_e' + b_e          (e an edge leaving node u)
with T a scalar per node, slot pair and batch row (rcc.passes.topology.affine_grid says which
cells do), as in Poeppel et al. (2025), section 4.

`ChunkRun` runs a generated module's level body three times over all nodes at once, reading
probe states instead of the real ones, to read b and T off the cell (it is affine in its states,
so U(0) = b, U(1 on slot i) - U(0 without the initial state) = T[., i]). `solve` then finds every
edge's state: the grid is cut into c x c chunks; inside a chunk, P = (I - A)^-1 = (I + A)(I + A^2)
(I + A^4)... (log-depth, A the chunk's transitions between its 2 c^2 edges, nilpotent) gives the
states from the chunk's sources and its 2c incoming border edges; a wavefront over the chunks'
anti-diagonals (X/c + Y/c - 1 steps) passes border states on. A last run of the body over all
nodes, reading the solved states, gives the outputs.
"""
from __future__ import annotations

import math

import torch

from .graph import GraphRun, Level, _Write, grid_schedule


def _chunk_indices(c):
    """Where T[a, b, out, in] of a chunk's node (a, b) goes: into A [E, E] (E = 2 c^2, edge
    (a * c + b) * 2 + out) from an edge inside the chunk, or into B [E, 2c] from the chunk's
    incoming border (0..c-1: from the chunk above, column b; c..2c-1: from the left, row a)."""
    E = 2 * c * c
    inner, inner_at, border, border_at = [], [], [], []
    for a in range(c):
        for b in range(c):
            for o in range(2):
                for i in range(2):
                    k = ((a * c + b) * 2 + o) * 2 + i
                    out = (a * c + b) * 2 + o
                    if i == 0:
                        src = ((a - 1) * c + b) * 2 if a else None
                        edge = b
                    else:
                        src = (a * c + b - 1) * 2 + 1 if b else None
                        edge = c + a
                    if src is None:
                        border.append(k)
                        border_at.append(out * 2 * c + edge)
                    else:
                        inner.append(k)
                        inner_at.append(out * E + src)
    down = [((c - 1) * c + b) * 2 for b in range(c)]  # edges leaving the chunk's last row
    right = [(a * c + c - 1) * 2 + 1 for a in range(c)]  # and its last column
    return [torch.tensor(v, dtype=torch.long) for v in (inner, inner_at, border, border_at, down + right)]


def solve(T, b, c):
    """Every edge's state of a grid: T [NB, X, Y, 2 (out), 2 (in)], b [NB, X, Y, 2, D] ->
    C [NB, X, Y, 2, D] with C[x, y, o] = T[x, y, o, 0] C[x-1, y, 0] + T[x, y, o, 1] C[x, y-1, 1]
    + b[x, y, o] (zero outside the grid)."""
    NB, X, Y = T.shape[:3]
    D = b.shape[-1]
    nx, ny = -(-X // c), -(-Y // c)
    # pad to whole chunks: the padding comes after the grid along both axes, so it feeds nothing
    T = torch.nn.functional.pad(T, (0, 0, 0, 0, 0, ny * c - Y, 0, nx * c - X))
    b = torch.nn.functional.pad(b, (0, 0, 0, 0, 0, ny * c - Y, 0, nx * c - X))
    E = 2 * c * c
    T = T.reshape(NB, nx, c, ny, c, 4).permute(0, 1, 3, 2, 4, 5).reshape(NB, nx, ny, c * c * 4)
    b = b.reshape(NB, nx, c, ny, c, 2, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(NB, nx, ny, E, D)
    inner, inner_at, border, border_at, out_edges = (t.to(T.device) for t in _chunk_indices(c))
    A = T.new_zeros(NB, nx, ny, E * E)
    A[..., inner_at] = T[..., inner]
    B = T.new_zeros(NB, nx, ny, E * 2 * c)
    B[..., border_at] = T[..., border]
    A, B = A.view(NB, nx, ny, E, E), B.view(NB, nx, ny, E, 2 * c)
    P, power = torch.eye(E, dtype=T.dtype, device=T.device) + A, A
    for _ in range(max(0, math.ceil(math.log2(2 * c - 1)) - 1)):  # paths of up to 2c-2 edges
        power = power @ power
        P = P + P @ power
    local = P @ b  # [.., E, D]: the states from the chunk's own sources
    through = P @ B  # [.., E, 2c]: and per unit state on each incoming border edge
    local_out, through_out = local[..., out_edges, :], through[..., out_edges, :]
    zero = T.new_zeros(NB, c, D)
    leaving = {}  # (I, J) -> [NB, 2c, D]: states on the edges leaving chunk (I, J)
    incoming = {}
    for diagonal in range(nx + ny - 1):  # the wavefront over chunks
        for I in range(max(0, diagonal - ny + 1), min(nx, diagonal + 1)):
            J = diagonal - I
            top = leaving[I - 1, J][:, :c] if I else zero
            left = leaving[I, J - 1][:, c:] if J else zero
            incoming[I, J] = torch.cat([top, left], 1)
            leaving[I, J] = local_out[:, I, J] + through_out[:, I, J] @ incoming[I, J]
    border_states = torch.stack([torch.stack([incoming[I, J] for J in range(ny)], 1)
                                 for I in range(nx)], 1)  # [NB, nx, ny, 2c, D]
    C = local + through @ border_states
    C = C.reshape(NB, nx, ny, c, c, 2, D).permute(0, 1, 3, 2, 4, 5, 6)
    return C.reshape(NB, nx * c, ny * c, 2, D)[:, :X, :Y]


def _probe_level(lv, n_edges):
    """`lv` reading probe rows: incoming row r reads probe row r; the virtual rows and missing
    pred(., k) edges read the initial state (row n_in)."""
    n_in = lv.n_in
    real = lv.in_edge < n_edges
    rows = torch.arange(n_in, device=real.device)
    probe_rows = torch.where(real, rows, n_in)
    row_of_edge = torch.full((n_edges + 1,), n_in, device=real.device)
    row_of_edge[lv.in_edge[real]] = rows[real]
    pred_rows = [row_of_edge[table] for table in lv.pred_edge]
    return Level(**{**vars(lv), "in_src": probe_rows, "in_edge": probe_rows,
                    "pred_src": pred_rows, "pred_edge": pred_rows})


class ChunkRun(GraphRun):
    """A GraphRun whose `levels` reads the cell's b and T, solves, then runs all nodes once."""

    def __init__(self, schedule, nb, grid, chunk, solver=None, per_channel=False):
        self.schedule, self.nb = schedule, nb
        self.per_channel = per_channel
        self.grid, self.chunk = grid, chunk
        self.solve = solver or solve  # or backend triton's kernels (rcc.runtime.triton.grid)
        first = schedule.levels[0]
        # every node in one level (cached with the schedules): rows in node order, outgoing rows
        # in edge order
        self.whole = grid_schedule(*grid, len(first.pred_src), hasattr(first, "in_pair"),
                                   schedule.inverse.device, whole=True).levels[0]
        if not hasattr(self.whole, "probe"):  # built once per grid, kept on the cached level
            self.whole.probe = _probe_level(self.whole, schedule.n_edges)
        self.mode = None

    @property
    def levels(self):
        lv, probe = self.whole, self.whole.probe
        real = lv.in_edge < self.schedule.n_edges
        self.captured = {}
        # "b": every incoming state 0 but the initial state; "T": plus, on the edges of slot i,
        # a state that is 1 at element i (0 elsewhere); "T1" (for scalar states): slot 1's edges
        # 1 at element 0. U(T) - U(b) at element i is then T[., i].
        self.slot_of_row = torch.where(real, lv.in_slot, -1)
        self.mode = "b"
        yield probe
        if self.per_channel:  # "ones0", "ones1": the edges of slot i all ones: T[., i] per channel
            for self.mode in ("ones0", "ones1"):
                yield probe
        else:
            self.mode = "T"
            yield probe
            if any(store.buf[0, 0].numel() < 2 for store in self.captured["b"]):
                self.mode = "T1"
                yield probe
        self.mode = None
        for store, (index, _) in self.captured["b"].items():
            self._solve_into(store, index)
        yield lv

    def _solve_into(self, store, index):
        """The affine form of one state's update, read off the probes, solved, written into
        `store` (so the last run and the final state read it)."""
        X, Y = self.grid
        nb = self.nb
        per_edge = index.numel() == 2 * X * Y  # an edge state; a node state has one row per node

        def rows(name):  # [X, Y, 2 (out), NB, *decl]
            v = self.captured[name][store][1].unflatten(0, (-1, nb))
            if per_edge:
                return v.reshape(X, Y, 2, *v.shape[1:])
            return v.reshape(X, Y, 1, *v.shape[1:]).expand(X, Y, 2, *v.shape[1:])

        def flat(v):  # [X, Y, 2, NB, D]
            return v.reshape(X, Y, 2, nb, -1)

        b = rows("b")
        decl = b.shape[4:]
        if self.per_channel:  # every channel its own grid recurrence: channels join the batch
            T = torch.stack([flat(rows("ones0") - b), flat(rows("ones1") - b)], -1)
            D = T.shape[4]
            T = T.permute(3, 4, 0, 1, 2, 5).reshape(nb * D, X, Y, 2, 2)
            C = self.solve(T, flat(b).permute(3, 4, 0, 1, 2).reshape(nb * D, X, Y, 2, 1),
                           self.chunk)
            C = C.reshape(nb, D, X, Y, 2).permute(2, 3, 4, 0, 1).reshape(X * Y, 2, nb, *decl)
        else:
            with_t = flat(rows("T") - b)
            if with_t.shape[-1] >= 2:
                T = with_t[..., :2]
            else:
                T = torch.cat([with_t, flat(rows("T1") - b)], -1)
            T = T.permute(3, 0, 1, 2, 4)  # [NB, X, Y, 2, 2]
            C = self.solve(T, flat(b).permute(3, 0, 1, 2, 4), self.chunk)
            C = C.permute(1, 2, 3, 0, 4).reshape(X * Y, 2, nb, *decl)
        values = C.reshape(2 * X * Y, nb, *decl) if per_edge else C[:, 0]
        every = torch.arange(values.shape[0], device=values.device)
        store.token = _Write.apply(store.token, values, store, every)

    def read(self, store, index):
        if self.mode is None:
            return super().read(store, index)
        n, decl = index.numel(), store.buf.shape[2:]
        ones = [1] * len(decl)
        at_initial = (index == self.whole.n_in).to(store.buf.dtype).view(-1, 1, *ones)
        v = at_initial * store.initial  # [n, NB, *decl]
        if self.mode in ("ones0", "ones1"):
            slot = torch.cat([self.slot_of_row, self.slot_of_row.new_full((1,), -1)])[index]
            v = v + (slot == int(self.mode[-1])).to(v.dtype).view(n, 1, *ones)
        elif self.mode != "b":
            slot = torch.cat([self.slot_of_row, self.slot_of_row.new_full((1,), -1)])[index]
            unit = store.buf.new_zeros(n, decl.numel())
            for i in (0, 1):
                element = 0 if self.mode == "T1" else i
                wanted = 1 if self.mode == "T1" else i
                if i == wanted and element < decl.numel():
                    unit[:, element] = (slot == i).to(unit.dtype)
            v = v + unit.view(n, 1, *decl)
        return v.expand(n, self.nb, *decl).flatten(0, 1)

    def write(self, store, index, v):
        if self.mode is not None:
            self.captured.setdefault(self.mode, {})[store] = (index, v)
        # the last run's updates equal the solved states already in the store

    def outputs(self, per_level):
        return per_level[-1]  # the last run, every node in node order

