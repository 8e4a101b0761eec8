"""Cells over grid2d and dag: a readable module that runs the graph level by level.

The loop is over the levels of rcc.runtime.graph.Schedule (anti-diagonals on a grid); each level
computes all its nodes, incoming edges, outgoing edges and pairs at once, as rows of the batch
axis (rcc.passes.topology says which values are per what). A value used at another kind of row
is gathered (`_g.at(v, _lv.node_in)`), sum_pred(...) is a scatter-add over the incoming rows
(`_g.sum(v, _lv.node_in, _lv.n_nodes)`), and states are read from and written to buffers that
hold every node's (or edge's) state.
"""
from __future__ import annotations

from rcc import ir
from rcc.passes.topology import per_channel_grid, spaces

from .expr import _atom
from .printer import TorchPrinter, _tuple

_ROWS = {"node": "n_nodes", "in": "n_in", "out": "n_out", "pair": "n_pair"}


class GraphPrinter(TorchPrinter):
    base_class = "_rt.GraphCellModule"

    def __init__(self, cell: ir.CellIR, source_name: str = "", plan: str = "sequential"):
        self.at = None  # the kind of row being printed ("node", "in", ...); None outside levels
        super().__init__(cell, source_name, plan)
        self.aggs = {n.attr("scope"): (n.attr("agg"), n.attr("k"))
                     for n in cell.nodes if n.op == "pred"}
        self.region_batch = {"const": "_N", "seq": "_N"}
        self.places = {d.name: d.over for d in cell.states}
        edge_states = tuple(d.name for d in cell.states if d.over == "edges")
        self.class_attrs = [f"    TOPOLOGY = {cell.topology!r}",
                            f"    SLOTS = {self.info.slots}",
                            f"    PAIRS = {self.info.pairs}",
                            f"    EDGE_STATES = {edge_states!r}",
                            f"    PLAN = {plan!r}"]
        if plan == "chunk" and per_channel_grid(cell):  # a gate per channel: solved per channel
            self.class_attrs.append("    PER_CHANNEL = True")

    def _body(self):
        for n in self.cell.nodes:
            if n.op == "slot":  # no statement: `take` names the slots of its own rows
                self.var[n.id] = f"_lv.{n.attr('side')}_slot"
        return super()._body()

    def _regions(self) -> dict:
        self.info = spaces(self.cell)
        self.space = self.info.space
        return {i: s if s in ("const", "seq") else "level" for i, s in self.space.items()}

    # ---- values at rows of another kind ---------------------------------------------------
    def _ref(self, i) -> str:
        text = super()._ref(i)
        have = self.space[i]
        if self.at is None or have == "const" or have == self.at:
            return text
        return f"_g.at({text}, _lv.{have}_{self.at})"

    def _rows(self, at) -> str:
        return f"_lv.{_ROWS[at]} * _NB"

    def _expr(self, n: ir.Node) -> str:
        if self.region[n.id] == "level":
            self.at = self.space[n.id]
            self.batch = self._rows(self.at)
        else:
            self.at = None
        if n.op == "state":
            return self._read_state(n)
        if n.op == "take":
            side = self.cell.node(n.args[1]).attr("side")
            slot = f"_lv.pair_{side}_slot" if self.at == "pair" else f"_lv.{side}_slot"
            return f"_g.take({self._ref(n.args[0])}, {slot}, {n.attr('axis')})"
        if n.op == "pred":
            return self._pred(n)
        return super()._expr(n)

    def _read_state(self, n) -> str:
        agg, k = self.aggs[n.attr("scope")]
        on_edges = self.places[n.attr("name")] == "edges"
        if agg == "index":
            index = f"_lv.pred_{'edge' if on_edges else 'src'}[{k}]"
        else:
            index = "_lv.in_edge" if on_edges else "_lv.in_src"
        return f"_g.read({self.decl_names[n.attr('name')]}, {index})"

    def _pred(self, n) -> str:
        agg, body, at = n.attr("agg"), n.args[0], self.at
        if agg == "index":
            return self._ref(body)
        edges = "pair" if at == "out" else "in"  # the rows reduced: per incoming edge
        self.at = edges
        text = self._ref(body)
        if self.space[body] == "const":  # the same value on every edge
            text = f"{_atom(text)}.expand({self._rows(edges)}, *{_atom(text)}.shape)"
        self.at = at
        index, rows = f"_lv.{at}_{edges}", f"_lv.{_ROWS[at]}"
        if agg == "mean":
            count = "_lv.in_count" if edges == "in" else "_lv.pair_count"
            return f"_g.mean({text}, {index}, {rows}, {count})"
        return f"_g.{agg}({text}, {index}, {rows})"

    # ---- forward --------------------------------------------------------------------------
    def _graph_head(self, body) -> list:
        """forward() up to the values computed once: the inputs and their GraphRun `_g`, dims,
        params, initial states and params' values, and the checks of the slots."""
        first = self.decl_names[self.cell.inputs[0].name]
        checks = self._slot_checks()  # before the prelude: it binds the dims they name
        lines = [
            ("    def forward(self, *args, edge_index=None, initial_state=None, output_final_state=True, "
             "**kwargs):"),
            "        if torch.compiler.is_compiling():  # one op: the schedule is data (rcc.runtime.ops)",
            "            return _rt.ops.call(self, args, kwargs, initial_state, output_final_state, "
            "edge_index)",
            f"        {_tuple(self.decl_names[d.name] for d in self.cell.inputs)}, _layout, _g = "
            "self._graph_inputs(args, kwargs, edge_index)",
            "        _NB = _g.nb  # batch times heads; every value is [rows * _NB, ...]",
            f"        _N = {first}.shape[0]  # nodes * _NB",
            f"        _dtype, _device = {first}.dtype, {first}.device",
        ]
        return lines + self._values_once(body, f"{first}[:_NB]") + checks

    def _forward(self, body):
        c = self.cell
        states = [self.decl_names[s.name] for s in c.states]
        lines = self._graph_head(body)
        if states:
            lines.append("        # every node's (edge's) state, and one more row: the initial state")
            lines += [f"        {self.decl_names[s.name]} = _g.buffer({self.decl_names[s.name]}, "
                      f"{s.over!r})" for s in c.states]
        if body["seq"]:
            lines.append("        # depends on the inputs but not on the states: every node at once")
            lines += ["        " + s for s in body["seq"]]
        out_levels = {name: self.ns.new(name + "_levels") for name, _, _ in c.outputs}
        lines += [f"        {v} = []" for v in out_levels.values()]
        lines.append("        for _lv in _g.levels:  # nodes whose predecessors are all done")
        lines += ["            " + s for s in body.get("level", [])]
        self.at, self.batch = "node", self._rows("node")
        for name, v, _ in c.outputs:
            lines.append(f"            {out_levels[name]}.append({self._batched_ref(v)})")
        for s, v in c.updates:
            if self.places[s] == "edges":
                self.at, self.batch = "out", self._rows("out")
                rows = "_lv.out_edge"
            else:
                self.at, self.batch = "node", self._rows("node")
                rows = "_lv.seq_node"
            lines.append(f"            _g.write({self.decl_names[s]}, {rows}, {self._batched_ref(v)})")
        self.at = None
        outs = _tuple(f"_g.outputs({v})" for v in out_levels.values())
        lines.append(f"        return self._graph_result({outs}, {_tuple(states)}, _layout, _g, "
                     "output_final_state)")
        return lines


    def _slot_checks(self) -> list:
        """Lines checking that every node's edges fit the axes in_slot / out_slot index."""
        checks = {}  # (side, size) -> the line checking it, for the first index that needs it
        for side, size, span in self.info.take_sizes:
            what = f"the axis indexed by {side}_slot at line {span.line}"
            checks.setdefault((side, size), f"        _g.check_slots({side!r}, "
                              f"{self._dim(size)}, {what!r})")
        return list(checks.values())


def print_module(cell: ir.CellIR, source_name: str = "", plan: str = "sequential") -> str:
    """plan 'sequential' runs the levels; 'chunk' (grid2d, cells rcc.passes.topology.affine_grid
    accepts) the same body through rcc.runtime.grid_chunk, which solves the states in chunks."""
    return GraphPrinter(cell, source_name, plan).module()
