"""The parallel plans' forward(): every step at once, over rows [T * N, ...] (time-major), with a
scan, Newton iterations or the chunkwise form in place of the loop over time (rcc.plans).
"""
from __future__ import annotations

from rcc import plans
from rcc.passes.linearize import ZERO

from .printer import TorchPrinter, _tuple


def _cone(cell, roots, stop=()):
    seen, work = set(), list(roots)
    while work:
        i = work.pop()
        if i not in seen:
            seen.add(i)
            if i not in stop:
                work.extend(cell.node(i).args)
    return seen


class PlanPrinter(TorchPrinter):
    """Shared by the plans: the outputs are computed after the states of every step are known,
    from each step's previous state (the state leaf) and next state (the update, bound)."""

    def __init__(self, cell, source_name, plan, roots):
        self.plan_roots = list(roots)  # what the plan's algorithm reads, before the outputs
        c = cell
        self.leaf = {n.attr("name"): n.id for n in c.nodes if n.op == "state"}
        updates = dict(c.updates)
        outputs = [v for _, v, _ in c.outputs]
        # an update the outputs read comes from the plan's result, not recomputed
        self.bound_next = {v: s for s, v in updates.items()
                           if v in _cone(c, outputs, set(updates.values()))
                           and _cone(c, [v]) & set(self.leaf.values())}
        self.out_cone = _cone(c, outputs, set(self.bound_next))
        super().__init__(cell, source_name, plan)
        self.live = _cone(c, self.plan_roots) | self.out_cone
        self.reads_prev = [s for s, i in self.leaf.items() if i in self.out_cone]

    def _regions(self) -> dict:
        """const: params and constants; seq: inputs but no state, before the plan's algorithm;
        out: reads a state, computed after it for the outputs."""
        region = {}
        stateful = set(self.leaf.values()) | set(self.bound_next)
        for n in self.cell.nodes:
            if n.id in stateful or any(region[a] == "out" for a in n.args):
                region[n.id] = "out"
            else:
                region[n.id] = "seq" if n.type.batched else "const"
        return region

    def module(self) -> str:
        c = self.cell
        # the state leaves stand for each step's previous state in the out region
        self.prev = {s: self.ns.new(s + "_prev") for s in self.reads_prev}
        for s, name in self.prev.items():
            self.var[self.leaf[s]] = name
        self.next = {v: self.ns.new(s + "_next") for v, s in self.bound_next.items()}
        self.var.update(self.next)
        return super().module()

    def _forward(self, body):
        c = self.cell
        seq = {d.name: self.ns.new(d.name + "_seq") for d in c.inputs}
        lines = self._forward_head(body, seq)
        lines.append("        # every step at once: rows [T * N, ...], time-major")
        lines.append("        _NT = _N * _T")
        outputs = {v for _, v, _ in c.outputs}
        for d in c.inputs:
            i = self._leaf_id("input", d.name)
            if any(u in self.live for u in self.users[i]) or i in outputs:
                lines.append(f"        {self.decl_names[d.name]} = {seq[d.name]}.transpose(0, 1)"
                             f".reshape(_NT, *{seq[d.name]}.shape[2:])")
        lines += ["        " + s for s in body["seq"]]
        finals = self._solve(lines)  # state name -> [T, N, ...] of every step's result
        for s, name in self.prev.items():
            init = self.decl_names[s]
            if s in finals:
                lines.append(f"        {name} = _rt.previous_steps({finals[s]}, {init})")
            else:
                lines.append(f"        {name} = _rt.every_step({init}, _T)")
        for v, name in self.next.items():
            lines.append(f"        {name} = {finals[self.bound_next[v]]}.flatten(0, 1)")
        if body["out"]:
            lines.append("        # the outputs, from each step's previous and next states")
            lines += ["        " + s for s in body["out"]]
        self.batch = "_NT"
        outs = [f"_rt.batch_major({self._batched_ref(v)}, _T)" for _, v, _ in c.outputs]
        self.batch = "_N"
        states = [f"{finals[s.name]}[-1]" if s.name in finals else self.decl_names[s.name]
                  for s in c.states]
        lines.append(f"        return self._result({_tuple(outs)}, {_tuple(states)}, _layout)")
        return lines

    def _solve(self, lines) -> dict:
        raise NotImplementedError


class ScanPrinter(PlanPrinter):
    """plan scan: each state's s' = a * s + b for all steps by one parallel linear scan."""

    def __init__(self, form: plans.ScanForm, source_name=""):
        self.form = form
        roots = [v for st in form.states for v in (st.coefficient, st.offset)
                 if v not in (None, ZERO)]
        super().__init__(form.cell, source_name, "scan", roots)
        for st in form.states:
            self.hints.setdefault(st.coefficient, f"{st.name}_decay")
            self.hints.setdefault(st.offset, f"{st.name}_input")

    def _solve(self, lines):
        finals = {}
        lines.append("        # s' = a * s + b for every step at once: a parallel linear scan")
        for st in self.form.states:
            init = self.decl_names[st.name]
            rank = len(next(d for d in self.cell.states if d.name == st.name).shape)
            finals[st.name] = steps = self.ns.new(st.name + "_steps")
            a = self._time_major(st.coefficient, rank, init, expand=False)
            b = self._time_major(st.offset, rank, init, expand=True)
            call = f"        {steps} = _rt.linear_scan({a}, {b}, {init})"
            lines += [call] if len(call) <= 110 else [
                f"        {steps} = _rt.linear_scan(", f"            {a},",
                f"            {b},", f"            {init},", "        )"]
        return finals

    def _time_major(self, v, rank, init, expand):
        """A coefficient (expand=False: it broadcasts) or offset (expand: [T, N, *state])."""
        full = f".expand(_T, *{init}.shape)" if expand else ""
        if v is None or v == ZERO:
            return f"{init}.new_zeros(()){full}"
        if self._is_const(v):
            return f"{init}.new_tensor({self._ref(v)}){full}"
        if self.cell.node(v).type.batched:
            return f"_rt.time_major({self._ref(v)}, _T, {rank}){full}"
        return f"{self._ref(v)}{full}"


def print_plan(cell, plan, analysis, source_name="") -> str:
    if plan == "scan":
        return ScanPrinter(plans.scan_form(cell, analysis), source_name).module()
    raise NotImplementedError(f"plan {plan!r}")
