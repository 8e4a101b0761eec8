"""What a fused loop-over-time kernel computes and what it is given (shared by backends cpp and
triton).

The kernel computes the values that read a state, and the pointwise values and views of the
inputs those read (computed per step, in cache or registers: materializing exp(g) for all steps
first would cost a pass over memory). What needs a GEMM or a reduction and reads no state
(W @ x) stays outside, for torch to compute for all steps at once; the kernel receives those
values per step ("seq" arguments) and the unbatched ones once ("const" arguments).

Built with hoist=False, the kernel computes every batched value, the projections of the inputs
too, and receives the inputs themselves: one call does a whole step, which is what a few rows
without gradients (decoding one token) want; a GEMM only pays for itself over many rows.
"""
from __future__ import annotations

from rcc import ir
from rcc.backends.torch.printer import _tuple
from rcc.codegen import regions
from rcc.passes.topology import spaces

from .pointwise import POINTWISE

VIEWS = ("getitem", "transpose")


def kernel_regions(cell: ir.CellIR) -> dict:
    """rcc.codegen.regions; over a graph, "step" is every value computed per node or edge
    (rcc.passes.topology.spaces), a sum_pred of inputs alone included."""
    if cell.topology == "seq":
        return regions(cell)
    return {i: s if s in ("const", "seq") else "step" for i, s in spaces(cell).space.items()}


class LoopPartition:
    def __init__(self, cell: ir.CellIR, hoist: bool = True):
        self.cell = cell
        self.hoist = hoist
        self.region = kernel_regions(cell)
        self.users = cell.users()
        self.roots = [v for _, v in cell.updates] + [v for _, v, _ in cell.outputs]
        self.uses = {i: len(u) for i, u in self.users.items()}
        for v in self.roots:
            self.uses[v] += 1
        self.step = self._inside()
        read = set(self.roots)
        for i in self.step:
            read.update(cell.node(i).args)
        inside = set(self.step)
        outside = sorted(i for i in read if i not in inside and cell.node(i).op not in ("const", "state"))
        self.seq = [i for i in outside if cell.node(i).type.batched]
        self.const = [i for i in outside if not cell.node(i).type.batched]
        self.state_node = {n.attr("name"): n.id for n in cell.nodes if n.op == "state"}
        self.updates = dict(cell.updates)

    def _inside(self) -> list:
        """The values the kernel computes, in order (see the module docstring)."""
        cell = self.cell
        inside = {n.id for n in cell.nodes if self.region[n.id] == "step" and n.op != "state"}
        work = list(self.roots) + [a for i in inside for a in cell.node(i).args]
        while work:
            i = work.pop()
            n = cell.node(i)
            if i in inside or self.region[i] != "seq" or n.op == "input":
                continue
            if not self.hoist or n.op in POINTWISE | set(VIEWS):
                inside.add(i)
                work.extend(n.args)
        return sorted(inside)


class FusedLoopPrinter:
    """Mixed into TorchPrinter by backends whose loop over time is one kernel call: torch
    computes what the kernel reads and does not compute itself (the partition's seq and const
    values), then `_run_call` runs every step. Subclasses set `self.part` before __init__ ends."""

    def _fused_init(self, part: LoopPartition, more_consts=()):
        self.part = part
        # torch computes what the kernel reads and does not compute itself (`more_consts`: what
        # another entry point of it reads)
        self.args = set(part.seq + part.const) | set(more_consts)
        self.live = ir.cone(self.cell.nodes, self.args)

    def _only_user_in(self, i, region) -> bool:
        # what the kernel reads gets a name: the kernel call passes it
        return i not in self.args and super()._only_user_in(i, region)

    def _forward(self, body):
        c, part = self.cell, self.part
        seq = {d.name: self.ns.new(d.name + "_seq") for d in c.inputs}
        shapes = [self._shape(c.node(v).type.shape) for _, v, _ in c.outputs]  # dims first
        self.built_for = {name: self._built_for(p.seq, p.const)
                          for name, p in self._kernel_entries().items()}
        lines = self._forward_head(body, seq)
        lines += self._whole_step_call(seq)
        # batch-major (no copy of the inputs): the kernel reads any strides
        self._seq_values(body["seq"], seq, lines, time_major=False)
        args = []
        for i in part.seq:  # [N, T, ...] views
            n = c.node(i)
            if n.op == "input":
                args.append(seq[n.attr('name')])
            else:
                ref = self._ref(i)
                args.append(f"{ref}.reshape(_N, _T, *{ref}.shape[1:])")
        consts = [self._ref(i) for i in part.const]
        states = [self.decl_names[s.name] for s in c.states]
        lines += self._run_call(_tuple(args), _tuple(consts), _tuple(states), _tuple(shapes),
                                self.built_for["run"])
        lines.append("        return self._result(_outs, _finals, _layout, output_final_state)")
        return lines

    def _run_call(self, args, consts, states, shapes, built_for) -> list:
        raise NotImplementedError

    def _kernel_entries(self) -> dict:
        """The kernel's entry points the module calls, by name: the values each reads."""
        return {"run": self.part}

    def _built_for(self, seq, const) -> str:
        """What the kernel is built for, per tensor it reads: (name, kind, shape), for the
        runtime's check (rcc.runtime.layout.check_built_for) before it passes a pointer."""
        c = self.cell
        items = [(self._ref(i) if c.node(i).op != "input" else c.node(i).attr("name"), "seq",
                  c.node(i).type.shape) for i in seq]
        items += [(self._ref(i), "const", c.node(i).type.shape) for i in const]
        items += [(d.name, "state", d.shape) for d in c.states]
        return _tuple(f"({name!r}, {kind!r}, {self._shape(shape)})" for name, kind, shape in items)

    def _whole_step_call(self, seq) -> list:
        """Lines before the hoisted values: a call of a kernel computing them too, for the calls
        that gain by it (none by default)."""
        return []
