"""Running a cell over a graph (LANGUAGE.md section 8): schedules and the gathers they need.

A `Schedule` splits the nodes of a DAG into levels, networkx's topological generations: every node
of a level has all its predecessors in earlier levels, so a level runs at once, as a batch of rows.
On a grid2d the levels are the anti-diagonals i + j = const (the wavefront: X + Y - 1 steps). Per
level it holds index tensors, built once per graph with numpy (never a Python loop over nodes):

- rows of four kinds: the level's nodes, its incoming edges ("in": one row per edge whose target
  is in the level, plus one virtual edge carrying the initial state for each node without
  predecessors), its outgoing edges ("out"), and the (incoming, outgoing) pairs of each node
  ("pair": where an edge state's update reads the edges coming in);
- `<from>_<to>` gathers between them ("seq" is every node of the graph, in node order), and
  `in_src` / `in_edge` (the node and edge an incoming row reads states from: row N / E of a state
  buffer is the initial state), the slots, and `pred_src[k]` / `pred_edge[k]` for pred(E, k).

Generated modules keep every per-row value flattened as [rows * NB, ...] (rows major, NB = batch
times heads), as the sequential loop keeps [N, ...], and states in a `Store` ([nodes + 1, NB, ...]).
"""
from __future__ import annotations

import collections
import math

import numpy as np
import torch

from .module import CellModule

_CACHE_SIZE = 16
_cache: "collections.OrderedDict" = collections.OrderedDict()


class Level:
    """The index tensors of one level (see the module docstring)."""

    def __init__(self, **arrays):
        for name, a in arrays.items():
            setattr(self, name, a)


class Schedule:
    """Levels of a graph with `n_nodes` nodes and `n_edges` edges (slots of state buffers)."""

    def __init__(self, levels, n_nodes, n_edges, inverse, slots):
        self.levels = levels
        self.n_nodes = n_nodes
        self.n_edges = n_edges
        self.inverse = inverse  # node order -> position in the concatenation of the levels
        self.slots = slots  # {"in": most incoming edges of a node (a source's virtual one
        # counts), "out": most outgoing}


def _segments(keys, n):
    """For integer keys in [0, n): the order that groups equal keys (stable), and each group's
    start in it."""
    order = np.argsort(keys, kind="stable")
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=starts[1:])
    return order, starts


def _build(src, tgt, in_slot, out_slot, level, n_nodes, n_edges, slots, pairs, device):
    """A Schedule from edges (src, tgt; tgt -1 for an edge leaving the graph, as a grid's border
    edges do) with their slots, and each node's level."""
    n_levels = int(level.max()) + 1
    node_order, node_start = _segments(level, n_levels)
    rank = np.empty(n_nodes, dtype=np.int64)  # a node's row within its level
    rank[node_order] = np.arange(n_nodes) - node_start[level[node_order]]
    real = tgt >= 0
    e_real = np.nonzero(real)[0]
    in_order, in_start = _segments(level[tgt[e_real]], n_levels)
    in_order = e_real[in_order]
    out_order, out_start = _segments(level[src], n_levels)
    indegree = np.bincount(tgt[e_real], minlength=n_nodes)

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=device)

    levels = []
    for L in range(n_levels):
        nodes = node_order[node_start[L]:node_start[L + 1]]
        n = len(nodes)
        e_in = in_order[in_start[L]:in_start[L + 1]]
        sources = nodes[indegree[nodes] == 0]  # they read the initial state through one edge
        in_node = np.concatenate([rank[tgt[e_in]], rank[sources]])
        in_src = np.concatenate([src[e_in], np.full(len(sources), n_nodes)])
        in_edge = np.concatenate([e_in, np.full(len(sources), n_edges)])
        in_sl = np.concatenate([in_slot[e_in], np.zeros(len(sources), dtype=np.int64)])
        e_out = out_order[out_start[L]:out_start[L + 1]]
        out_node = rank[src[e_out]]
        arrays = dict(
            n_nodes=n, n_in=len(in_node), n_out=len(e_out),
            seq_node=t(nodes), seq_in=t(nodes[in_node]), seq_out=t(nodes[out_node]),
            node_in=t(in_node), node_out=t(out_node),
            in_src=t(in_src), in_edge=t(in_edge), in_slot=t(in_sl),
            out_edge=t(e_out), out_slot=t(out_slot[e_out]),
            in_count=t(np.bincount(in_node, minlength=n)))
        if pairs:  # every (incoming, outgoing) edge pair of each node
            in_by_node, in_first = _segments(in_node, n)
            out_by_node, out_first = _segments(out_node, n)
            n_out_of = np.diff(out_first)
            per_in = n_out_of[in_node[in_by_node]]
            pair_in = np.repeat(in_by_node, per_in)
            within = np.arange(len(pair_in)) - np.repeat(np.cumsum(per_in) - per_in, per_in)
            pair_out = out_by_node[out_first[in_node[pair_in]] + within]
            arrays.update(
                n_pair=len(pair_in), in_pair=t(pair_in), out_pair=t(pair_out),
                node_pair=t(in_node[pair_in]), seq_pair=t(nodes[in_node[pair_in]]),
                pair_in_slot=t(in_sl[pair_in]), pair_out_slot=t(out_slot[e_out][pair_out]),
                pair_count=t(np.bincount(pair_out, minlength=len(e_out))))
        pred_src, pred_edge = [], []
        for k in range(slots):  # pred(E, k): the k-th incoming edge, or the initial state
            ps, pe = np.full(n, n_nodes), np.full(n, n_edges)
            hit = in_slot[e_in] == k
            ps[rank[tgt[e_in[hit]]]] = src[e_in[hit]]
            pe[rank[tgt[e_in[hit]]]] = e_in[hit]
            pred_src.append(t(ps))
            pred_edge.append(t(pe))
        arrays.update(pred_src=pred_src, pred_edge=pred_edge)
        levels.append(Level(**arrays))
    inverse = np.empty(n_nodes, dtype=np.int64)
    inverse[node_order] = np.arange(n_nodes)
    slots_used = {"in": max(1, int(in_slot[e_real].max()) + 1 if len(e_real) else 1),
                  "out": int(out_slot.max()) + 1 if len(src) else 0}
    return Schedule(levels, n_nodes, n_edges, t(inverse), slots_used)


def _cached(key, make):
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = _cache[key] = make()
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def grid_edges(X, Y):
    """The edges of an X x Y grid as (src, tgt, slot): node (i, j) is i * Y + j; its outgoing
    edges 2 * node + 0 to (i+1, j) (slot 0) and 2 * node + 1 to (i, j+1) (slot 1), border ones
    included with target -1 (they lead out of the grid: their states are in the final state, no
    node reads them). An edge's slot is the same at both ends."""
    i, j = np.divmod(np.arange(X * Y), Y)
    src = np.repeat(np.arange(X * Y), 2)
    slot = np.tile(np.array([0, 1]), X * Y)
    ti, tj = np.repeat(i, 2) + (slot == 0), np.repeat(j, 2) + (slot == 1)
    return src, np.where((ti < X) & (tj < Y), ti * Y + tj, -1), slot


def grid_schedule(X, Y, slots=0, pairs=False, device="cpu", whole=False) -> Schedule:
    """The wavefront of an X x Y grid (grid_edges): level i + j holds node (i, j); or, with
    `whole`, one level of every node (plan chunk's runs over all nodes at once)."""
    def make():
        src, tgt, slot = grid_edges(X, Y)
        i, j = np.divmod(np.arange(X * Y), Y)
        level = np.zeros(X * Y, dtype=np.int64) if whole else i + j
        return _build(src, tgt, slot, slot, level, X * Y, 2 * X * Y, slots, pairs, device)
    return _cached(("grid2d", X, Y, slots, pairs, str(device), whole), make)


def dag_schedule(edge_index, n_nodes, slots=0, pairs=False) -> Schedule:
    """The levels of the DAG `edge_index` [2, E] (source, target) over nodes 0..n_nodes-1; an
    edge's slot is its rank among its target's incoming (its source's outgoing) edges, in
    edge_index order. A cycle is a ValueError naming one."""
    if not isinstance(edge_index, torch.Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor [2, E], got {type(edge_index).__name__}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index has shape {list(edge_index.shape)}; expected [2, E] "
                         "(sources, targets) as in PyTorch Geometric")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise TypeError(f"edge_index must hold integers, got {edge_index.dtype}")
    ei = edge_index.detach().to("cpu", torch.long).numpy()
    if ei.size and (ei.min() < 0 or ei.max() >= n_nodes):
        bad = int(ei.min()) if ei.min() < 0 else int(ei.max())
        raise ValueError(f"edge_index names node {bad}, but the inputs have {n_nodes} nodes "
                         f"(0 to {n_nodes - 1})")

    def make():
        import networkx as nx

        src, tgt = ei[0].copy(), ei[1].copy()
        graph = nx.DiGraph()
        graph.add_nodes_from(range(n_nodes))
        graph.add_edges_from(zip(src.tolist(), tgt.tolist()))
        if not nx.is_directed_acyclic_graph(graph):
            cycle = [u for u, _ in nx.find_cycle(graph)]
            path = " -> ".join(str(u) for u in cycle + cycle[:1])
            raise ValueError(f"edge_index has a cycle ({path}); a recurrence runs over a "
                             "directed acyclic graph")
        level = np.empty(n_nodes, dtype=np.int64)
        for L, nodes in enumerate(nx.topological_generations(graph)):
            level[list(nodes)] = L
        in_slot, out_slot = _ranks(tgt, n_nodes), _ranks(src, n_nodes)
        return _build(src, tgt, in_slot, out_slot, level, n_nodes, len(src), slots, pairs,
                      edge_index.device)
    key = ("dag", n_nodes, slots, pairs, str(edge_index.device), ei.tobytes())
    return _cached(key, make)


def _ranks(keys, n):
    """Each entry's rank among the entries with the same key, in order."""
    order, starts = _segments(keys, n)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - starts[keys[order]]
    return rank


class Store:
    """Every node's (or edge's) state, and one row more with the initial state, as a plain tensor
    [rows + 1, NB, *decl] written level by level. Autograd sees reads and writes through a token
    that each write replaces: a read depends on the writes before it, so backward meets the reads
    of a row before the write that filled it, whose gradient they have accumulated by then. (An
    in-place index_copy_ on one big tensor would make backward copy the whole buffer's gradient
    once per level.)"""

    def __init__(self, initial, rows):
        self.initial = initial  # [NB, *decl], what sources read (plan chunk reads it directly)
        self.buf = initial.detach().unsqueeze(0).expand(rows + 1, *initial.shape).clone()
        self.grad = None
        self.token = _Fill.apply(initial, self)

    def grad_buffer(self):
        if self.grad is None:
            self.grad = torch.zeros_like(self.buf)
        return self.grad


class _Fill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, initial, store):
        ctx.store = store
        return initial.new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _):
        # rows never overwritten still hold the initial state: their gradients are its gradient
        return ctx.store.grad_buffer().sum(0), None


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, values, store, index):
        store.buf[index] = values.detach().to(store.buf.dtype)
        ctx.store, ctx.index = store, index
        return token.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_token):
        grad = ctx.store.grad_buffer()
        g_values = grad[ctx.index]
        grad[ctx.index] = 0  # what was read before this write came from an earlier value
        return g_token, g_values, None, None


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, store, index):
        ctx.store, ctx.index = store, index
        return store.buf[index]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        ctx.store.grad_buffer().index_add_(0, ctx.index, g)
        return torch.zeros((), dtype=g.dtype, device=g.device), None, None


class GraphRun:
    """A schedule and the batch size NB of one call: what generated code calls per level."""

    def __init__(self, schedule: Schedule, nb: int):
        self.schedule = schedule
        self.levels = schedule.levels
        self.nb = nb

    def at(self, v, index):
        """Rows `index` of a per-row value [R * NB, ...]."""
        return v.unflatten(0, (-1, self.nb))[index].flatten(0, 1)

    def read(self, store, index):
        """Rows `index` of a state Store, as [len(index) * NB, ...]."""
        if not store.token.requires_grad:  # no gradient to route: skip autograd's bookkeeping
            return store.buf[index].flatten(0, 1)
        return _Read.apply(store.token, store, index).flatten(0, 1)

    def write(self, store, index, v):
        v = v.unflatten(0, (-1, self.nb))
        if torch.is_grad_enabled() and (v.requires_grad or store.token.requires_grad):
            store.token = _Write.apply(store.token, v, store, index)
        else:
            store.buf[index] = v.to(store.buf.dtype)

    def sum(self, v, index, n):
        v = v.unflatten(0, (-1, self.nb))
        return v.new_zeros(n, *v.shape[1:]).index_add_(0, index, v).flatten(0, 1)

    def mean(self, v, index, n, count):
        total = self.sum(v, index, n).unflatten(0, (n, self.nb))
        count = count.to(total.dtype).view(n, *[1] * (total.dim() - 1))
        return (total / count).flatten(0, 1)

    def max(self, v, index, n):
        v = v.unflatten(0, (-1, self.nb))
        where = index.view(-1, *[1] * (v.dim() - 1)).expand_as(v)
        out = v.new_zeros(n, *v.shape[1:])
        return out.scatter_reduce(0, where, v, "amax", include_self=False).flatten(0, 1)

    def take(self, x, slot, axis):
        """x[row, ..., slot[row], ...] at declared axis `axis` (x: [R * NB, *decl])."""
        x = x.unflatten(0, (-1, self.nb))
        index = slot.view(-1, *[1] * (x.dim() - 1))
        return torch.take_along_dim(x, index, dim=axis + 2).squeeze(axis + 2).flatten(0, 1)

    def buffer(self, initial, place):
        """A state for every node (or edge), all starting at `initial` [NB, *decl], and one row
        more that keeps `initial`: what a node without predecessors reads."""
        rows = self.schedule.n_nodes if place == "nodes" else self.schedule.n_edges
        return Store(initial, rows)

    def final(self, store):
        """Every row of a Store but the initial one: [rows, NB, *decl]."""
        rows = torch.arange(store.buf.shape[0] - 1, device=store.buf.device)
        return _Read.apply(store.token, store, rows)

    def outputs(self, per_level):
        """Per-level output rows, concatenated and put back in node order: [nodes * NB, ...]."""
        rows = torch.cat(per_level).unflatten(0, (-1, self.nb))
        return rows[self.schedule.inverse].flatten(0, 1)

    def check_slots(self, side, size, what):
        """A slot index must fit the axis it indexes (M[in_slot] with M[P] and a node with more
        than P incoming edges is a ValueError, not an index error deep in torch)."""
        most = self.schedule.slots[side]
        if most > size:
            where = "incoming" if side == "in" else "outgoing"
            raise ValueError(f"a node has {most} {where} edges, but {what} has {size} slots "
                             f"for them")


class GraphCellModule(CellModule):
    """The base of modules generated for cells over grid2d or dag."""

    TOPOLOGY = "dag"
    SLOTS = 0  # how many pred(E, k) tables the cell reads (the largest k + 1)
    PAIRS = False  # whether an edge state's update reads incoming edges
    EDGE_STATES: tuple = ()  # the states that live on edges
    PLAN = "sequential"  # or "chunk" (grid2d, cells affine in their states: rcc.runtime.grid_chunk)
    chunk_size = 4  # plan chunk's chunks are chunk_size x chunk_size nodes
    SOLVE = None  # plan chunk's solve of the affine form: rcc.runtime.grid_chunk.solve if None
    PER_CHANNEL = False  # plan chunk: a transition per channel (a gate of shape [d])

    def _graph_inputs(self, args, kwargs, edge_index):
        """Inputs [B, N, *heads, *decl] (dag) or [B, X, Y, *heads, *decl] (grid2d) as
        [N * NB, *decl] (node major), the layout (B, heads, node shape) and the GraphRun."""
        given = self._bind_inputs(args, kwargs)
        lead = 2 if self.TOPOLOGY == "grid2d" else 1
        axes = "B, X, Y" if lead == 2 else "B, N"
        if self.TOPOLOGY == "grid2d" and edge_index is not None:
            raise TypeError(f"{self.CELL} runs over grid2d, whose edges are fixed: it takes no "
                            "edge_index")
        if self.TOPOLOGY == "dag" and edge_index is None:
            raise TypeError(f"{self.CELL} runs over dag: pass the graph as edge_index=[2, E] "
                            "(sources, targets)")
        layout, out = None, []
        for name in self.INPUTS:
            x = given[name]
            decl = tuple(self.shapes[name])
            nh = x.dim() - 1 - lead - len(decl)
            if nh < 0 or tuple(x.shape[x.dim() - len(decl):]) != decl:
                want = f"[{axes}, *heads" + "".join(f", {s}" for s in decl) + "]"
                raise ValueError(f"input {name!r} has shape {list(x.shape)} but {self.CELL} "
                                 f"expects {want}")
            this = (x.shape[0], tuple(x.shape[1 + lead:1 + lead + nh]), tuple(x.shape[1:1 + lead]))
            if layout is None:
                layout = this
            elif this != layout:
                raise ValueError(f"input {name!r} has shape {list(x.shape)}: its batch, node and "
                                 f"head sizes differ from the first input's")
            if x.numel() == 0:
                raise ValueError(f"input {name!r} is empty (shape {list(x.shape)})")
            if not x.is_floating_point():
                raise TypeError(f"input {name!r} must be floating point, got {x.dtype}")
            n = math.prod(this[2])
            out.append(x.reshape(x.shape[0], n, -1).transpose(0, 1).reshape(-1, *decl))
        B, heads, nodes = layout
        if self.TOPOLOGY == "grid2d":
            schedule = grid_schedule(*nodes, self.SLOTS, self.PAIRS, out[0].device)
            if self.PLAN == "chunk":
                from .grid_chunk import ChunkRun
                return out, layout, ChunkRun(schedule, B * math.prod(heads), nodes,
                                             self.chunk_size, self.SOLVE, self.PER_CHANNEL)
        else:
            schedule = dag_schedule(edge_index, nodes[0], self.SLOTS, self.PAIRS)
            if schedule.levels[0].seq_node.device != out[0].device:
                raise ValueError(f"edge_index is on {edge_index.device} but the inputs are on "
                                 f"{out[0].device}")
        return out, layout, GraphRun(schedule, B * math.prod(heads))

    def _graph_result(self, outputs, states, layout, run, output_final_state=True):
        """Outputs [N * NB, *o] -> [B, *nodes, *heads, *o]; node states likewise; edge states
        [B, E, *heads, *decl] (dag) or [B, X, Y, 2, *heads, *decl] (grid2d: the edges to (i+1, j)
        and (i, j+1)); None for the final states where `output_final_state` is False."""
        B, heads, nodes = layout

        def unflatten(v, lead):  # [R, NB, *o] -> [B, *lead, *heads, *o]
            rows, rest = v.shape[0], v.shape[2:]
            v = v.reshape(rows, B, -1).transpose(0, 1)
            return v.reshape(B, *lead, *heads, *rest)

        outs = tuple(unflatten(y.unflatten(0, (-1, B * math.prod(heads))), nodes)
                     for y in outputs)
        if not output_final_state:
            return (outs[0] if len(outs) == 1 else outs), None
        final = {}
        for name, store in zip(self.STATES, states):
            # a Store, or (backend cpp) every node's state already, [nodes, NB, *decl]
            values = store if isinstance(store, torch.Tensor) else run.final(store)
            if name in self.EDGE_STATES:
                lead = (*nodes, 2) if self.TOPOLOGY == "grid2d" else (values.shape[0],)
            else:
                lead = nodes
            final[name] = unflatten(values, lead).contiguous()
        return (outs[0] if len(outs) == 1 else outs), final
