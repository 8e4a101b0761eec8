"""Backend 'cpp' for cells over grid2d and dag: the level schedule in one C++ kernel.

The kernel runs the levels of rcc.runtime.graph's Schedule in order (the anti-diagonals on a
grid); the nodes of a level, times blocks of batch rows, are OpenMP tasks with a barrier between
levels. A task computes one node the way kernel.py computes one step, but reads states from a
store holding every node's state (row `nodes` holds the initial one) at the row of the
predecessor an edge brings, and runs sum_pred / mean_pred(E) as a loop over the node's incoming
edges (CSR), computing E's values one edge at a time. pred(E, k) reads through the k-th edge.

The backward runs the levels in reverse. A task recomputes its node, takes its state's adjoint
from what its successors left on its outgoing edges (one adjoint row per edge, and one per node
for the initial state it read: tasks never write to the same place), and leaves the adjoint of
each state it read on the edge it read it through.

A state on edges (pLSTM) lives in a store with a row per edge (and one per node for the initial
state, what a source's virtual edge reads); its update is computed per outgoing edge of the node
(out_slot its slot there), sum_pred inside it per (incoming, outgoing) pair. Its adjoint, like a
node state's, is what the edge's reader left on the edge's row.
"""
from __future__ import annotations

from rcc import ir
from rcc.backends.torch.graph import GraphPrinter
from rcc.backends.torch.printer import _tuple
from rcc.passes.topology import spaces

from ..loop import FusedLoopPrinter, LoopPartition
from .kernel import KernelPrinter, _paren, _part, c_name
from .printer import CppKernelMethods

GRAPH_ARRAYS = ("level_ptr", "order", "in_ptr", "in_src", "in_edge", "in_slot", "out_ptr",
                "out_edge", "out_slot", "pred_src", "pred_edge")  # rcc.runtime.cpp.GraphIndex


def unsupported(cell: ir.CellIR):
    """What of this graph cell backend 'cpp' cannot run yet, or None: a state no update writes
    (its rows would have to keep the initial state, and their adjoints flow to it)."""
    updated = dict(cell.updates)
    for d in cell.states:
        if d.name not in updated:
            return f"state '{d.name}' is never updated"
    return None


def _tag(scope) -> str:
    """A predecessor form's scope (an int, maybe negative) as part of a C++ name."""
    return f"m{-scope}" if scope < 0 else str(scope)


class GraphKernelPrinter(KernelPrinter):
    def __init__(self, cell: ir.CellIR):
        super().__init__(cell)
        space = spaces(cell).space
        self.on_edges = {d.name for d in cell.states if d.over == "edges"}
        preds = [n for n in cell.nodes if n.op == "pred"]
        # index maps without an array or an adjoint of their own: pred(E, k) is E read through
        # one edge, x[in_slot] an element of x; a slot is an integer of the edge loop
        self.index_preds = {n.id for n in preds if n.attr("agg") == "index"}
        self.aliases = self.index_preds | {n.id for n in cell.nodes if n.op in ("take", "slot")}
        self.stored -= self.aliases
        self.adjoint = [i for i in self.adjoint if i not in self.aliases]
        self.index_scopes = {n.attr("scope"): n.attr("k") for n in preds
                             if n.attr("agg") == "index"}
        scope_of = {}  # value per incoming edge (or pair) -> the scope of its pred form
        for n in cell.nodes:
            if space[n.id] in ("in", "pair"):
                scope_of[n.id] = (n.attr("scope") if n.op in ("state", "slot") else
                                  next(scope_of[a] for a in n.args if a in scope_of))
        # per outgoing edge: what an edge state's update computes (a pair's sum_pred included)
        self.out_values = [i for i in self.step if space[i] == "out"]
        # per node: the rest (pointwise values of the inputs the kernel computes included)
        self.node_values = [i for i in self.step if i not in scope_of and space[i] != "out"]
        self.edge_values = {}
        for i in self.step:
            if i in scope_of:
                self.edge_values.setdefault(scope_of[i], []).append(i)

    # ---- states through edges ---------------------------------------------------------------
    def _state_base(self, store, n) -> str:
        """Where lane 0 of the state node n reads starts in `store` (S: values, gE: adjoints):
        at the row its scope's edge gives (src<t>: the node it comes from, for a node state's
        value; edge<t>: the edge)."""
        node_row = store == "S" and n.attr("name") not in self.on_edges
        return f"({'src' if node_row else 'edge'}{_tag(n.attr('scope'))} * N + n0) * {self.F(n.id)}"

    def _take_index(self, n, idx):
        """The index of x that element idx of x[slot] (take) reads: the edge loop's slot."""
        slot = self.cell.node(n.args[1])
        var = f"islot{_tag(slot.attr('scope'))}" if slot.attr("side") == "in" else "oslot"
        axis = n.attr("axis")
        return tuple(idx[:axis]) + (var,) + tuple(idx[axis:])

    def access(self, i, idx) -> str:
        n = self.cell.node(i)
        if n.op == "state":
            j = self.state_index[n.attr("name")]
            return f"S{j}[{self._state_base('S', n)} + {_paren(self.row(i, idx))}]"
        if i in self.index_preds:
            return self.access(n.args[0], idx)
        if n.op == "take":
            return self.access(n.args[0], self._take_index(n, idx))
        return super().access(i, idx)

    def accumulate(self, i, idx, expr) -> list:
        n = self.cell.node(i)
        if i in self.index_preds:
            return self.accumulate(n.args[0], idx, expr)
        if n.op == "take":
            return self.accumulate(n.args[0], self._take_index(n, idx), expr)
        if n.op == "state":
            j = self.state_index[n.attr("name")]
            return [f"gE{j}[{self._state_base('gE', n)} + {_paren(self.row(i, idx))}] += {expr};"]
        return super().accumulate(i, idx, expr)

    def plain(self, i, arrays):
        n = self.cell.node(i)
        if i in self.index_preds:
            return self.plain(n.args[0], arrays)
        if n.op == "take":
            return None
        if n.op == "state":
            store = arrays["store"]
            j = self.state_index[n.attr("name")]
            return f"({store}{j} + {self._state_base(store, n)})", self.F(i)
        return super().plain(i, arrays)

    @property
    def access_arrays(self):
        return {**super().access_arrays, "store": "S"}

    @property
    def adjoint_arrays(self):
        return {**super().adjoint_arrays, "store": "gE"}

    # ---- sum_pred / mean_pred: a loop over the incoming edges ---------------------------------
    def _edges(self, n, body) -> list:
        """Lines looping over node's incoming edges (a source's one virtual edge reads the
        initial state), with `body` (lines) inside, indented."""
        t = _tag(n.attr("scope"))
        return ([f"      for (long e{t} = in_ptr[node]; e{t} < in_ptr[node + 1]; ++e{t}) {{",
                 f"        const long src{t} = in_src[e{t}], edge{t} = in_edge[e{t}], "
                 f"islot{t} = in_slot[e{t}];"]
                + ["  " + line for line in body] + ["      }"])

    def _count(self):
        return "R(in_ptr[node + 1] - in_ptr[node])"

    def forward(self, i) -> list:
        n = self.cell.node(i)
        if n.op != "pred":
            return super().forward(i)
        body, agg = n.args[0], n.attr("agg")
        w = lambda idx: f"w{i}[{self.row(i, idx)}]"  # noqa: E731
        per_edge = self._edge_values(n, backward=False)
        per_edge += self.loop(n.type.shape, lambda idx, ind: [
            f"{ind}{w(idx)} = rcc_max({w(idx)}, {self.access(body, idx)});" if agg == "max" else
            f"{ind}{w(idx)} += {self.access(body, idx)};"])
        lines = [f"      // {agg}_pred {self.describe(n)}: over the incoming edges"]
        if agg == "max":
            lines.append(f"      std::fill(w{i}.p, w{i}.p + nb * {self.F(i)}, "
                         "-std::numeric_limits<R>::infinity());")
        else:
            lines.append(f"      w{i}.zero();")
        lines += self._edges(n, per_edge)
        if agg == "mean":
            lines += self.loop(n.type.shape, lambda idx, ind: [f"{ind}{w(idx)} /= {self._count()};"])
        return lines

    def _edge_values(self, n, backward) -> list:
        """Lines computing, for one incoming edge, the values of n's predecessor form that have
        arrays (and zeroing their adjoints, for the backward)."""
        values = self.edge_values.get(n.attr("scope"), [])
        lines = [line for v in values if v in self.stored for line in self.forward(v)]
        return lines + [f"      g{v}.zero();" for v in values if backward and v in self.adjoint]

    def backward(self, i) -> list:
        n = self.cell.node(i)
        if n.op != "pred":
            return super().backward(i)
        body, agg = n.args[0], n.attr("agg")
        values = self.edge_values.get(n.attr("scope"), [])
        g = lambda idx: f"g{i}[{self.row(i, idx)}]"  # noqa: E731
        lines = [f"      // adjoint of {agg}_pred {self.describe(n)}: each incoming edge again"]
        if agg == "max":  # torch splits the gradient evenly between equal maxima: count them
            lines.append(f"      ties{i}.zero();")
            lines += self._edges(n, self._edge_values(n, backward=False) + self.loop(
                n.type.shape, lambda idx, ind: [
                    f"{ind}ties{i}[{self.row(i, idx)}] += "
                    f"{self.access(body, idx)} == {self.access(i, idx)} ? R(1) : R(0);"]))
            # arithmetic, not a select of a quotient: gcc 12 -O3 with AVX-512 miscompiled
            # `hit ? g / ties : 0` here (wrong gradients on such machines)
            seed = lambda idx: (f"R({self.access(body, idx)} == {self.access(i, idx)}) * "  # noqa
                                f"{g(idx)} / std::max(ties{i}[{self.row(i, idx)}], R(1))")
        elif agg == "mean":
            seed = lambda idx: f"{g(idx)} / {self._count()}"  # noqa: E731
        else:
            seed = g
        per_edge = self._edge_values(n, backward=True)
        per_edge += self.loop(n.type.shape, lambda idx, ind: [
            ind + s for s in self.accumulate(body, idx, seed(idx))])
        per_edge += [line for v in reversed(values) if v in self.adjoint
                     for line in self.backward(v)]
        return lines + self._edges(n, per_edge)

    # ---- the source -----------------------------------------------------------------------------
    def _sized(self) -> set:
        states = {n.id for n in self.cell.nodes if n.op == "state"}
        return super()._sized() | states

    def graph_source(self) -> str:
        row = ["#include <omp.h>", "",
               "// A thread's row of an accumulator [threads, ...] (a param's gradient summed over the",
               "// nodes the thread ran; torch adds the rows).",
               "template <typename R> struct Row {",
               "  R* p;",
               "  R& operator[](long i) { return p[i]; }",
               "};", ""]
        lines = self._head("the levels of a graph schedule for one cell", row, self._sized())
        lines += _part(1, self._graph_fn(backward=False), "forward")
        lines += _part(2, self._storing_all(lambda: self._graph_fn(backward=True)), "backward")
        return "\n".join(lines) + "\n"

    def _graph_args(self, backward) -> list:
        """Unpack the pointer table (rcc.runtime.cpp.graph builds it): size = [N (rows of a
        node: batch x heads), nodes, edges, threads, levels]; p = seq args [nodes, N, ...],
        const args, state stores ([nodes + 1, N, ...], [edges + nodes, N, ...] on edges: the
        initial state in the rows past the nodes or edges), then forward: outputs [nodes, N, ...];
        backward: output grads and final-state grads (or null), seq grads, const grads
        [threads, ...], edge adjoints [edges + nodes, N, ...] (zeros); then GRAPH_ARRAYS."""
        c = self.cell
        lines = ["  const long N = size[0], nodes = size[1];",
                 "  const int threads = int(size[3]);",
                 "  const long levels = size[4];"]
        ptr = 0

        def arg(decl, comment=""):
            nonlocal ptr
            kind, name = decl.rsplit(" ", 1)
            lines.append(f"  {kind} const {name} = static_cast<{kind}>(p[{ptr}]);"
                         + (f"  // {comment}" if comment else ""))
            ptr += 1
        for k, i in enumerate(self.seq):
            arg(f"const R* seq{k}", f"{self.describe(c.node(i))}, [nodes, N, F{i}]")
        for k, i in enumerate(self.const):
            arg(f"const R* c{k}", self.describe(c.node(i)))
        for j, d in enumerate(c.states):
            rows = "edges + nodes" if d.name in self.on_edges else "nodes + 1"
            arg(f"{'const R*' if backward else 'R*'} S{j}",
                f"state {c_name(d.name)}, [{rows}, N, ...]")
        if not backward:
            for k, (name, v, _) in enumerate(c.outputs):
                arg(f"R* out{k}", f"output {c_name(name)}, [nodes, N, F{v}]")
        else:
            for k, (name, v, _) in enumerate(c.outputs):
                arg(f"const R* gout{k}", f"[nodes, N, F{v}], or null")
            for j in range(len(c.states)):
                arg(f"const R* gfinal{j}", "[nodes (or edges), N, ...], or null")
            for k in range(len(self.seq)):
                arg(f"R* gseq{k}", "[nodes, N, ...]")
            for k in range(len(self.const)):
                arg(f"R* gconst{k}", "[threads, ...]: a row per thread")
            for j in range(len(c.states)):
                arg(f"R* gE{j}", "[edges + nodes, N, ...]: the adjoint read through each edge")
        for name in GRAPH_ARRAYS:
            arg(f"const long* {name}")
        return lines

    def _task_head(self) -> list:
        lines = ["        const long node = order[first + task / blocks];",
                 "        const long n0 = (task % blocks) * rows, nb = std::min(rows, N - n0);"]
        for k, i in enumerate(self.seq):
            lines.append(f"        const R* const x{k} = seq{k} + (node * N + n0) * {self.F(i)};")
            lines.append(f"        constexpr long xn{k} = {self.F(i)};")
        for scope, k in sorted(self.index_scopes.items()):
            t = _tag(scope)
            lines.append(f"        const long src{t} = pred_src[{k} * nodes + node], "
                         f"edge{t} = pred_edge[{k} * nodes + node];  // pred(..., {k})")
        return lines

    def _values(self, ids) -> list:
        return [line for i in ids if i in self.stored for line in self.forward(i)]

    def _out_edges(self, body) -> list:
        """Lines looping over the node's outgoing edges (oslot: the edge's slot at the node)."""
        return (["      for (long o = out_ptr[node]; o < out_ptr[node + 1]; ++o) {",
                 "        const long oedge = out_edge[o], oslot = out_slot[o];"]
                + ["  " + line for line in body] + ["      }"])

    def _row_of(self, sname, v, idx) -> str:
        """Element idx (lane b) of state `sname`'s row in its store (or final-state gradient):
        this node's, or the outgoing edge's for a state on edges."""
        row = "oedge" if sname in self.on_edges else "node"
        return f"({row} * N + n0) * {self.F(v)} + {_paren(self.row(v, idx))}"

    def _forward_body(self) -> list:
        c = self.cell
        body = self._values(self.node_values)
        for k, (oname, v, _) in enumerate(c.outputs):
            body.append(f"      // output {c_name(oname)}")
            body += self.loop(c.node(v).type.shape, lambda idx, ind, k=k, v=v: [
                f"{ind}out{k}[(node * N + n0) * {self.F(v)} + {_paren(self.row(v, idx))}] = "
                f"{self.access(v, idx)};"])
        per_edge = self._values(self.out_values)
        for sname, v in c.updates:
            j = self.state_index[sname]
            lines = self.loop(c.node(v).type.shape, lambda idx, ind, j=j, v=v, sname=sname: [
                f"{ind}S{j}[{self._row_of(sname, v, idx)}] = {self.access(v, idx)};"])
            if sname in self.on_edges:
                per_edge += [f"      // {c_name(sname)}' on this edge"] + lines
            else:
                body += [f"      // {c_name(sname)}' (this node's row: no task reads it now)"] + lines
        if self.on_edges:
            body += ["      // per outgoing edge: the states on edges"] + self._out_edges(per_edge)
        return body

    def _state_seed(self, sname, v) -> list:
        """Lines adding to the adjoint of state `sname`'s next value its final gradient and what
        its readers left: on the outgoing edges' rows of gE (a node state), or on the edge's."""
        j, shape = self.state_index[sname], self.cell.node(v).type.shape
        if sname in self.on_edges:
            return self.loop(shape, lambda idx, ind: [
                f"{ind}const long at = {self._row_of(sname, v, idx)};",
                f"{ind}const R gn = (gfinal{j} ? gfinal{j}[at] : R(0)) + gE{j}[at];",
                *[ind + s for s in self.accumulate(v, idx, "gn")]])
        return self.loop(shape, lambda idx, ind: [
            f"{ind}const long at = {_paren(self.row(v, idx))};",
            f"{ind}R gn = gfinal{j} ? gfinal{j}[(node * N + n0) * {self.F(v)} + at] : R(0);",
            f"{ind}for (long o = out_ptr[node]; o < out_ptr[node + 1]; ++o)",
            f"{ind}  gn += gE{j}[(out_edge[o] * N + n0) * {self.F(v)} + at];",
            *[ind + s for s in self.accumulate(v, idx, "gn")]])

    def _backward_body(self) -> list:
        c = self.cell
        body = ["      // the node again"] + self._values(self.node_values)
        body += [f"      g{i}.zero();" for i in self.adjoint if i in self.node_values]
        body += [f"      gx{k}.zero();" for k in range(len(self.seq))]
        body.append("      // adjoints of this node's outputs and states")
        for k, (_, v, _) in enumerate(c.outputs):
            body.append(f"      if (gout{k}) {{")
            body += self.loop(c.node(v).type.shape, lambda idx, ind, k=k, v=v: [
                ind + s for s in self.accumulate(
                    v, idx, f"gout{k}[(node * N + n0) * {self.F(v)} + "
                            f"{_paren(self.row(v, idx))}]")], indent="        ")
            body.append("      }")
        for sname, v in c.updates:
            if sname not in self.on_edges:
                body += self._state_seed(sname, v)
        if self.on_edges:  # each outgoing edge's update again, then its adjoint
            per_edge = self._values(self.out_values)
            per_edge += [f"      g{i}.zero();" for i in self.adjoint if i in self.out_values]
            for sname, v in c.updates:
                if sname in self.on_edges:
                    per_edge += self._state_seed(sname, v)
            per_edge += [line for i in reversed(self.out_values) if i in self.adjoint
                         for line in self.backward(i)]
            body += ["      // per outgoing edge: the states on edges"] + self._out_edges(per_edge)
        body += [line for i in reversed(self.node_values) if i in self.adjoint
                 for line in self.backward(i)]
        body += [f"      std::copy(gx{k}.p, gx{k}.p + nb * {self.F(i)}, "
                 f"gseq{k} + (node * N + n0) * {self.F(i)});" for k, i in enumerate(self.seq)]
        return body

    def _graph_fn(self, backward) -> list:
        name = "backward" if backward else "forward"
        lines = ["template <typename R>", f"static void {name}(const long* size, void* const* p) {{"]
        lines += self._graph_args(backward)
        packs = self._packs(False) + (self._packs(True) if backward else [])
        lines += ["  const bool packed = nodes * N >= PACK_MIN;"] * bool(packs) + packs
        lines += ["  const long rows = std::max(1L, std::min(long(ROWS_PER_BLOCK), N));",
                  "  const long blocks = (N + rows - 1) / rows;",
                  "  #pragma omp parallel num_threads(threads)",
                  "  {"]
        if backward:
            lines += [f"    Row<R> gc{k}{{gconst{k} + omp_get_thread_num() * {self.F(i)}}};"
                      for k, i in enumerate(self.const)]
        arrays = sorted(self.stored)
        lines += [f"    Buffer<R> w{i}(rows * {self.F(i)});" for i in arrays]
        if backward:
            lines += [f"    Buffer<R> g{i}(rows * {self.F(i)});" for i in self.adjoint]
            lines += [f"    Buffer<R> gx{k}(rows * {self.F(i)});" for k, i in enumerate(self.seq)]
            lines += [f"    Buffer<R> ties{i}(rows * {self.F(i)});"
                      for i in self.node_values + self.out_values
                      if self.cell.node(i).op == "pred" and self.cell.node(i).attr("agg") == "max"]
        order = "for (long L = levels - 1; L >= 0; --L)" if backward else \
            "for (long L = 0; L < levels; ++L)"
        lines += [f"    {order} {{",
                  "      const long first = level_ptr[L];",
                  "      const long tasks = (level_ptr[L + 1] - first) * blocks;",
                  "      #pragma omp for schedule(static)",
                  "      for (long task = 0; task < tasks; ++task) {"]
        lines += self._task_head()
        body = self._backward_body() if backward else self._forward_body()
        lines += ["  " + line for line in body]
        lines += ["      }", "    }", "  }", "}"]
        return lines


class CppGraphPrinter(CppKernelMethods, FusedLoopPrinter, GraphPrinter):
    backend = "cpp"
    needs = "torch and rcc.runtime only (and a C++ compiler)"

    def __init__(self, cell: ir.CellIR, source_name: str = ""):
        super().__init__(cell, source_name, "sequential")
        self._fused_init(LoopPartition(cell))
        self.kernel = GraphKernelPrinter(cell)
        self.class_attrs += self._kernel_methods()

    def _kernel_source(self) -> str:
        return self.kernel.graph_source()

    def _forward(self, body):
        c, part = self.cell, self.part
        states = [self.decl_names[s.name] for s in c.states]
        built_for = self._built_for(part.seq, part.const)  # before the head binds the dims it uses
        lines = self._graph_head(body)  # with the slot checks: the kernel indexes unchecked
        if body["seq"]:
            lines.append("        # depends on the inputs but not on the states: every node at once")
            lines += ["        " + s for s in body["seq"]]
        shapes = [self._shape(c.node(v).type.shape) for _, v, _ in c.outputs]
        on_edges = [str(d.over == "edges") for d in c.states]
        lines += [
            "        # every level in the C++ kernel (the nodes of a level at once), with gradients",
            "        _outs, _finals = _rt.cpp.graph(self._kernel(), _g,",
            f"            {_tuple(self._ref(i) for i in part.seq)},",
            f"            {_tuple(self._ref(i) for i in part.const)},",
            f"            {_tuple(states)}, {_tuple(shapes)}, on_edges={_tuple(on_edges)},",
            f"            built_for={built_for})",
            "        return self._graph_result(_outs, _finals, _layout, _g, output_final_state)",
        ]
        return lines


def print_module(cell: ir.CellIR, source_name: str = "") -> str:
    return CppGraphPrinter(cell, source_name).module()

