"""The parallel plans' forward(): every step at once, over rows [T * N, ...] (time-major), with a
scan, Newton iterations or the chunkwise form in place of the loop over time (rcc.plans).
"""
from __future__ import annotations

from rcc import ir, plans
from rcc.passes.linearize import ZERO

from .expr import _atom
from .printer import TorchPrinter, _tuple


def _cone(cell, roots, stop=()):
    return ir.cone(cell.nodes, roots, stop)


class PlanPrinter(TorchPrinter):
    """Shared by the plans: the outputs are computed after the states of every step are known,
    from each step's previous state (the state leaf) and next state (the update, bound)."""
    kernels = "_rt"  # the module whose scans and chunkwise kernels the plan calls

    def __init__(self, c, source_name, plan, roots, bound=None):
        self.plan_roots = list(roots)  # what the plan's algorithm reads, before the outputs
        self.leaf = {n.attr("name"): n.id for n in c.nodes if n.op == "state"}
        updates = dict(c.updates)
        outputs = [v for _, v, _ in c.outputs]
        # values the plan's algorithm gives (node -> name): by default the next states the
        # outputs read, which are not computed again
        self.bound = bound if bound is not None else {
            v: s + "_next" for s, v in updates.items()
            if v in _cone(c, outputs, set(updates.values()))
            and _cone(c, [v]) & set(self.leaf.values())}
        self.out_cone = _cone(c, outputs, set(self.bound))
        super().__init__(c, source_name, plan)
        self.live = _cone(c, self.plan_roots) | self.out_cone
        self.reads_prev = [s for s, i in self.leaf.items() if i in self.out_cone]

    given = frozenset()  # values the plan computes before its algorithm (plan chunk's max-plus)

    def _regions(self) -> dict:
        """const: params and constants; seq: inputs but no state, before the plan's algorithm;
        given: reads `given` values and no other state, between their computation and the
        algorithm; out: reads a state, computed after it for the outputs."""
        region = {}
        stateful = (set(self.leaf.values()) | set(self.bound)) - self.given
        for n in self.cell.nodes:
            if n.id in stateful or any(region[a] == "out" for a in n.args):
                region[n.id] = "out"
            elif n.id in self.given or any(region[a] == "given" for a in n.args):
                region[n.id] = "given"
            else:
                region[n.id] = "seq" if n.type.batched else "const"
        return region

    def module(self) -> str:
        # the state leaves stand for each step's previous state in the out region
        self.prev = {s: self.ns.new(s + "_prev") for s in self.reads_prev}
        for s, name in self.prev.items():
            self.var[self.leaf[s]] = name
        self.next = {v: self.ns.new(name) for v, name in self.bound.items()}
        self.var.update(self.next)
        return super().module()

    def _forward(self, body):
        c = self.cell
        seq = {d.name: self.ns.new(d.name + "_seq") for d in c.inputs}
        lines = self._forward_head(body, seq)
        lines.append("        # every step at once: rows [T * N, ...], time-major")
        lines.append("        _NT = _N * _T")
        for d in c.inputs:
            if self._leaf_id("input", d.name) in self.live:
                lines.append(f"        {self.decl_names[d.name]} = {seq[d.name]}.transpose(0, 1)"
                             f".reshape(_NT, *{seq[d.name]}.shape[2:])")
        lines += ["        " + s for s in body["seq"]]
        finals = self._solve(lines)  # state name -> its final value [N, ...]
        out = body["out"] + self._out_block()
        if out:
            lines.append("        # the outputs, from each step's previous and next states")
            lines += ["        " + s for s in out]
        outs = [f"_rt.batch_major({text}, _T)" for text in self._output_refs()]
        states = [finals.get(s.name, self.decl_names[s.name]) for s in c.states]
        lines.append(f"        return self._result({_tuple(outs)}, {_tuple(states)}, _layout, "
                     "output_final_state)")
        return lines

    def _solve(self, lines) -> dict:
        raise NotImplementedError

    def _bind_steps(self, lines, steps) -> dict:
        """Bind the outputs' previous and next states from every step's result ([T, N, ...]
        per state); returns the final states."""
        updated = dict(self.cell.updates)
        for s, name in self.prev.items():
            init = self.decl_names[s]
            if s in steps:
                lines.append(f"        {name} = _rt.previous_steps({steps[s]}, {init})")
            else:
                lines.append(f"        {name} = _rt.every_step({init}, _T)")
        for v, name in self.next.items():
            state = next(s for s, u in updated.items() if u == v)
            lines.append(f"        {name} = {steps[state]}.flatten(0, 1)")
        return {s: f"{v}[-1]" for s, v in steps.items()}

    def _out_block(self):
        return []

    def _output_refs(self):
        self.batch = "_NT"
        refs = [self._batched_ref(v) for _, v, _ in self.cell.outputs]
        self.batch = "_N"
        return refs


class ScanPrinter(PlanPrinter):
    """plan scan: each state's s' = a * s + b for all steps by one parallel linear scan."""

    def __init__(self, form: plans.ScanForm, source_name=""):
        self.form = form
        roots = [v for st in form.states for v in (st.coefficient, st.offset)
                 if v not in (None, ZERO)] + [v for row in form.matrix for v in row
                                              if v not in (None, ZERO)]
        super().__init__(form.cell, source_name, "scan", roots)
        for st in form.states:
            self.hints.setdefault(st.coefficient, f"{st.name}_decay")
            self.hints.setdefault(st.offset, f"{st.name}_input")

    def _solve(self, lines):
        if self.form.matrix:
            return self._block_solve(lines)
        finals = {}
        lines.append("        # s' = a * s + b for every step at once: a parallel linear scan")
        for st in self.form.states:
            init = self.decl_names[st.name]
            rank = len(next(d for d in self.cell.states if d.name == st.name).shape)
            finals[st.name] = steps = self.ns.new(st.name + "_steps")
            a = self._time_major(st.coefficient, rank, init, expand=False)
            b = self._time_major(st.offset, rank, init, expand=True)
            call = f"        {steps} = {self.kernels}.linear_scan({a}, {b}, {init})"
            lines += [call] if len(call) <= 110 else [
                f"        {steps} = {self.kernels}.linear_scan(", f"            {a},",
                f"            {b},", f"            {init},", "        )"]
        return self._bind_steps(lines, finals)

    def _block_solve(self, lines):
        """Coupled states: s' = A s + b over k x k blocks pairing equal elements, one block scan."""
        names = [st.name for st in self.form.states]
        inits = [self.decl_names[s] for s in names]
        rank = len(self.cell.states[0].shape)
        A = [[self._time_major(v, rank, inits[0], expand=True) for v in row]
             for row in self.form.matrix]
        b = [self._time_major(st.offset, rank, inits[0], expand=True) for st in self.form.states]
        rows = ", ".join(f"torch.stack([{', '.join(r)}], -1)" for r in A)
        steps = self.ns.new("block_steps")
        lines += [f"        # the {len(names)} coupled states' s' = A s + b for every step at once: "
                  f"a block scan of {len(names)} x {len(names)} blocks",
                  f"        {steps} = {self.kernels}.block_scan(",
                  f"            torch.stack([{rows}], -2),",
                  f"            torch.stack([{', '.join(b)}], -1),",
                  f"            torch.stack([{', '.join(inits)}], -1),",
                  "        )"]
        finals = {s: self.ns.new(s + "_steps") for s in names}
        lines.append(f"        {_tuple(finals.values())} = {steps}.unbind(-1)")
        return self._bind_steps(lines, finals)

    def _time_major(self, v, rank, init, expand):
        """A coefficient (expand=False: it broadcasts) or offset (expand: [T, N, *state])."""
        full = f".expand(_T, *{init}.shape)" if expand else ""
        if v is None or v == ZERO:
            return f"{init}.new_zeros(()){full}"
        if self._is_const(v):
            return f"{init}.new_tensor({self._ref(v)}){full}"
        if self.cell.node(v).type.batched:
            return f"_rt.time_major({self._ref(v)}, _T, {rank}){full}"
        return f"{_atom(self._ref(v))}{full}"  # an expression printed in place: (v + 1.0)


class NewtonPrinter(PlanPrinter):
    """plan newton: s' = f(s, x) for all steps at once by parallel Newton iterations; the step
    and its Jacobian (derived on the IR) are printed as local functions of the states."""

    def __init__(self, form: plans.NewtonForm, source_name=""):
        self.form = form
        cell = form.cell
        nxt = dict(cell.updates)
        self.next_of = {s: nxt.get(s, next(n.id for n in cell.nodes if n.op == "state"
                                             and n.attr("name") == s)) for s in form.states}
        self.jac_ids = [v for row in form.jacobian for v in row if v is not None]
        roots = list(self.next_of.values()) + self.jac_ids
        super().__init__(cell, source_name, "newton", roots)
        self.class_attrs = [
            "    # Newton: at most max_iter iterations (None: the solver's default), stopping once the",
            "    # residual is below tol (None: a tolerance from the dtype); stats of the last call",
            "    max_iter = None", "    tol = None", "    last_stats = None"]
        stateful = {i for i, r in self.region.items() if r == "out"}
        # the step is printed in scopes of its own; the leaves it reads are bound before them
        self.live = {i for i in self.live if i not in stateful or cell.node(i).op == "state"}
        self.stateful = stateful
        for i, row in zip(form.states, form.jacobian):
            for j, v in zip(form.states, row):
                self.hints.setdefault(v, f"d{i}_d{j}")
        self.rank = len(next(d for d in cell.states if d.name == form.states[0]).shape)

    def _scope(self, roots, batch, state_names, render=lambda: None):
        """Statements computing `roots`' stateful cone in a scope of its own (a local function or
        the outputs' block), the state leaves named `state_names`. Returns (lines, what `render`
        returns when called inside the scope, ids of the outside values the scope reads)."""
        ids = _cone(self.cell, roots, set(self.bound) if batch == "_NT" else ())
        ids = (ids & self.stateful) - set(self.leaf.values())
        saved = self.var, self.inline, self.live, self.region
        self.var, self.inline = dict(self.var), dict(self.inline)
        for s, name in state_names.items():
            self.var[self.leaf[s]] = name
        if batch != "_NT":  # a step computes its next states; the outputs read them bound
            for v in self.bound:
                self.var.pop(v, None)
        self.live = ids
        self.region = {**self.region, **{i: "scope" for i in ids}}
        self.region_batch["scope"] = batch
        body = self._body()["scope"]
        self.batch = batch
        rendered = render()
        self.batch = "_N"
        # what the scope reads: the arguments of its values and the roots it does not compute
        # (a state-free next state or Jacobian entry), never a closure over all steps' rows
        reads = [a for i in ids for a in self.cell.node(i).args] + list(roots)
        outside = sorted({a for a in reads if a not in ids and not self._is_const(a)
                          and a not in self.leaf.values() and a not in self.bound})
        self.var, self.inline, self.live, self.region = saved
        return body, rendered, outside

    def _next_states(self):
        state_vars = {s: self.decl_names[s] for s in self.form.states}
        return _tuple(self._batched_ref(self.next_of[s]) if self.next_of[s] != self.leaf[s]
                      else state_vars[s] for s in self.form.states)

    def _jacobian_rows(self):
        rows = [_tuple("None" if v is None else self._jac_entry(v) for v in row)
                for row in self.form.jacobian]
        return _tuple(rows)

    def _forward(self, body):
        names = self.form.states
        state_vars = {s: self.decl_names[s] for s in names}
        nexts = list(self.next_of.values())
        step, step_ret, step_reads = self._scope(nexts, "_rows", state_vars, self._next_states)
        jac, jac_ret, jac_reads = self._scope(
            nexts + self.jac_ids, "_rows", state_vars,
            lambda: f"{self._next_states()}, {self._jacobian_rows()}")
        reads = sorted(set(step_reads) | set(jac_reads))
        self.out_lines, self.out_refs = [], None
        outs = [v for _, v, _ in self.cell.outputs]
        if self.stateful & _cone(self.cell, outs, set(self.bound)) - set(self.leaf.values()):
            self.out_lines, self.out_refs, _ = self._scope(outs, "_NT", self.prev_names(),
                                                           super()._output_refs)
        self.reads = reads  # the ids of what _step and _jacobian read besides the states
        args = [self.var[a] for a in reads]
        self.fn_args_tuple = _tuple(args)
        self.fn_mask = _tuple("True" if self.cell.node(a).type.batched else "False" for a in reads)
        self.signature = signature = "(_prev" + "".join(", " + a for a in args) + "):"
        head = [f"        {_tuple(state_vars.values())} = _prev",
                "        _rows = _prev[0].shape[0]  # T * N, or N for one step"]
        self.step_fn = ["    def _step" + signature, *head, *["        " + ln for ln in step],
                        f"        return {step_ret}"]
        self.jac_fn = ["    def _jacobian" + signature, *head, *["        " + ln for ln in jac],
                       "        # the next states, and d next_i / d prev_j elementwise",
                       f"        return {jac_ret}"]
        return super()._forward(body)

    def prev_names(self):
        return {s: self.var[self.leaf[s]] for s in self.reads_prev}

    def _jac_entry(self, v):
        if self._is_const(v):
            return f"_prev[0].new_tensor({self._ref(v)})"
        return self._operand(v, self.rank, least=0)

    def _solve(self, lines):
        names = self.form.states
        finals = {s: self.ns.new(s + "_steps") for s in names}
        init = _tuple(self.decl_names[s] for s in names)
        lines.append("        # s' = f(s, x) for every step at once: parallel Newton iterations, "
                     "each a linear scan")
        lines += ["    " + ln if ln else "" for ln in self.step_fn + [""] + self.jac_fn + [""]]
        lines.append(f"        {_tuple(finals.values())}, self.last_stats = _rt.newton_solve(")
        lines.append(f"            _step, _jacobian, {init}, {self.fn_args_tuple},")
        lines.append(f"            block={len(names)}, max_iter=self.max_iter, tol=self.tol, length=_T,")
        lines.append(f"            seq_mask={self.fn_mask},  # which arguments are per-step rows")
        if self.kernels != "_rt":
            lines.append(f"            scans={self.kernels},  # the scans' kernels")
        lines.append("        )")
        return self._bind_steps(lines, finals)

    def _out_block(self):
        return self.out_lines

    def _output_refs(self):
        return self.out_refs or super()._output_refs()


class ChunkPrinter(PlanPrinter):
    """plan chunk: the matrix state in chunks of `chunk_size` steps (intra-chunk matmuls,
    inter-chunk state passing; Householder products through the UT transform)."""

    def __init__(self, form: plans.ChunkForm, source_name=""):
        self.form = form
        self.readout = form.readouts[0]
        pieces = [v for m in form.steps for v in (m.log_decay, m.a, m.b, m.k, m.u)]
        roots = [v for v in (form.log_decay, *form.keys, *form.values, *form.betas, *pieces,
                             *(c for _, c, _ in form.folded), self.readout.q,
                             self.readout.extra, *(v for m in form.maxplus for v in (m.a, m.b)))
                 if v is not None]
        bound = {self.readout.node: "readout", **{n: f"{z}_read" for z, _, n in form.folded},
                 **{m.update: f"{m.state}_next" for m in form.maxplus}}
        # a max-plus state's values are given (its scan runs first): what reads them and no
        # other state is computed for all steps between that scan and the chunkwise solve
        self.given = frozenset(i for m in form.maxplus for i in (m.leaf, m.update))
        super().__init__(form.cell, source_name, "chunk", roots, bound=bound)
        self.class_attrs = ["    chunk_size = 64  # steps per chunk (set it on the module)"]
        self.decl = next(d for d in form.cell.states if d.name == form.state)
        given_states = {m.state for m in form.maxplus}
        self.reads_prev = [s for s in self.reads_prev if s not in given_states]

    def module(self) -> str:
        for m in self.form.maxplus:  # the previous values, every step: bound by _solve
            self.var[m.leaf] = self.ns.new(m.state + "_prev")
        return super().module()

    def _forward(self, body):
        self.body = body
        return super()._forward(body)

    def _maxplus(self, lines) -> dict:
        """Each max-plus state's scan, then the values that read the given states; returns the
        states' final values."""
        finals = {}
        for m in self.form.maxplus:
            init = self.decl_names[m.state]
            rank = len(next(d for d in self.cell.states if d.name == m.state).shape)
            self.batch = "_NT"
            a, b = (f"_rt.time_major({self._batched_ref(v)}, _T, {rank})" for v in (m.a, m.b))
            self.batch = "_N"
            steps = self.ns.new(m.state + "_steps")
            lines += [f"        # {m.state}' = max({m.state} + a, b) for every step: a max-plus scan",
                      f"        {steps} = {self.kernels}.maxplus_scan({a}, {b}, {init})",
                      f"        {self.var[m.leaf]} = _rt.previous_steps({steps}, {init})",
                      f"        {self.next[m.update]} = {steps}.flatten(0, 1)"]
            finals[m.state] = f"{steps}[-1]"
        lines += ["        " + s for s in self.body.get("given", [])]
        return finals

    def _chunks(self, v, shape, heads):
        """Node `v` (or a list of nodes, stacked on a new axis 1) as [N * H, T, ...]."""
        self.batch = "_NT"
        if isinstance(v, list):
            text = f"torch.stack([{', '.join(self._batched_ref(i) for i in v)}], 1)"
            batched = True
        elif self._is_const(v):
            text, batched = f"{self.decl_names[self.form.state]}.new_tensor({self._ref(v)})", False
        else:
            text, batched = self._ref(v), self.cell.node(v).type.batched
        self.batch = "_N"
        if batched:
            text = f"_rt.time_major({text}, _T, {len(shape)})"
        return f"_rt.to_chunks({text}, _T, _N, {self._shape(shape)}, {heads})"

    def _solve(self, lines):
        given_finals = self._maxplus(lines) if self.form.maxplus else {}
        return {**self._chunk_solve(lines), **given_finals}

    def _chunk_solve(self, lines):
        f, d = self.form, self.decl
        init = self.decl_names[f.state]
        K, V = d.shape[-2], d.shape[-1]
        heads = len(f.heads)
        q = self._chunks(self.readout.q, (*f.heads, K), heads)
        out, final = self.ns.new("readout"), self.ns.new(f.state + "_last")
        s0 = f"{init}.reshape(-1, *{init}.shape[-2:])"
        if f.kind == "linear":
            width = d.shape[-2] if self.cell.node(f.log_decay).type.shape[-1:] == (K,) else 1
            decay = self._chunks(f.log_decay, (*f.heads, width), heads)
            values = self._chunks(f.values[0], (*f.heads, V), heads)
            if f.folded:  # each folded vector state one more value column (and state column)
                values = "torch.cat([" + ", ".join([values] + [self._chunks(c, (1,), 0)
                                                               for _, c, _ in f.folded]) + "], -1)"
                s0 = "torch.cat([" + ", ".join([s0] + [f"{self.decl_names[z]}[..., None]"
                                                       for z, _, _ in f.folded]) + "], -1)"
            args = [q, self._chunks(f.keys[0], (*f.heads, K), heads), values, decay, s0]
            read = "S" if self.readout.prev else "S'"
            lines.append(f"        # S' = decay * S + k v^T, o = q @ {read}: chunkwise parallel")
            call = f"{self.kernels}.chunk_linear_attention"
        elif f.kind == "dplr":
            M = len(f.steps)
            width = {"u": V, "log_decay": self.cell.node(f.steps[0].log_decay).type.shape[-1]}
            args = [q] + [self._chunks([getattr(m, piece) for m in f.steps],
                                       (M, width.get(piece, K)), 0)
                          for piece in ("log_decay", "a", "b", "k", "u")] + [s0]
            lines.append(f"        # S <- diag(e^g) S + a (b^T S) + k u^T, {M} micro-step(s) a "
                         "token, o = q @ S': chunkwise (one triangular solve per chunk)")
            call = f"{self.kernels}.chunk_dplr"
        else:
            n_h = len(f.keys)
            decay = "None" if f.log_decay is None else self._chunks(f.log_decay, (), 0)
            args = [q, self._chunks(list(f.keys), (n_h, K), 0),
                    self._chunks(list(f.values), (n_h, V), 0),
                    self._chunks(list(f.betas), (n_h,), 0), decay, s0]
            lines.append(f"        # S' = (gate) then {n_h} Householder factor(s) (I - beta k k^T) S"
                         " + k u^T, o = q @ S': chunkwise (UT transform)")
            call = f"{self.kernels}.chunk_delta_rule"
        lines.append(f"        {out}, {final} = {call}(")
        lines += [f"            {a}," for a in args]
        lines.append("            chunk_size=self.chunk_size,")
        if self.readout.prev:
            lines.append("            prev=True,  # o_t reads the state before step t")
        lines.append("        )")
        extra = ""
        if self.readout.extra is not None:  # q @ X of an output q @ (S + X), every step at once
            self.batch = "_NT"
            extra = f" + {self._batched_ref(self.readout.extra)}"
            self.batch = "_N"
        if f.folded:
            rows = self.ns.new("readouts")
            lines.append(f"        {rows} = _rt.from_chunks({out}, _T, _N, {self._shape(f.heads)})")
            V_ = self._dim(V)
            lines.append(f"        {self.next[self.readout.node]} = {rows}[..., :{V_}]{extra}")
            finals = {f.state: f"{final}[..., :{V_}]"}
            for i, (z, _, node) in enumerate(f.folded):
                lines.append(f"        {self.next[node]} = {rows}[..., {V_} + {i}]")
                finals[z] = f"{final}[..., {V_} + {i}]"
            return finals
        lines.append(f"        {self.next[self.readout.node]} = _rt.from_chunks({out}, _T, _N, "
                     f"{self._shape(f.heads)}){extra}")
        return {f.state: f"{final}.reshape({init}.shape)"}


def print_plan(cell, plan, analysis, source_name="", printers=None) -> str:
    """The module of a parallel plan; `printers` (plan -> printer class) lets a backend print
    its own (backend triton's call its Triton kernels)."""
    printers = printers or {"scan": ScanPrinter, "newton": NewtonPrinter, "chunk": ChunkPrinter}
    if plan == "scan":
        return printers["scan"](plans.scan_form(cell, analysis), source_name).module()
    if plan == "newton":
        return printers["newton"](plans.newton_form(cell, analysis), source_name).module()
    if plan == "chunk":
        try:
            form = plans.chunk_form(cell)
        except plans.NotChunkable as e:
            raise plans.illegal("chunk", analysis, cell, str(e)) from None
        return printers["chunk"](form, source_name).module()
    raise NotImplementedError(f"plan {plan!r}")


def plan_facts(cell, analysis) -> dict:
    """What the cost model (rcc.runtime.cost) counts for each legal plan: the operations one
    step runs and the operations each plan issues per call."""
    step_ops = max(1, _count_ops(cell, (i for i, r in TorchPrinter(cell).region.items()
                                        if r == "step")))
    facts = {"sequential": {"step_ops": step_ops}}
    for plan in analysis.plans:
        if plan == "scan":
            printer = ScanPrinter(plans.scan_form(cell, analysis))
        elif plan == "newton":
            printer = NewtonPrinter(plans.newton_form(cell, analysis))
        elif plan == "chunk":
            printer = ChunkPrinter(plans.chunk_form(cell))
        else:
            continue
        # Newton's step and Jacobian run every iteration; the other plans' statements once
        issued = _cone(printer.cell, printer.plan_roots) if plan == "newton" else printer.live
        facts[plan] = {"step_ops": step_ops, "plan_ops": max(1, _count_ops(printer.cell, issued)),
                       "block": len(cell.states)}
        if plan == "chunk":
            facts[plan]["matrix_state"] = printer.form.state
    return facts


def _count_ops(cell, ids):
    return sum(1 for i in ids if cell.node(i).op not in ("input", "param", "state", "const"))
