"""The loop over time of a cell whose step works unit by unit (unit_layout.py), as Triton kernels
tiled over hidden units and rows: what plan sequential runs at model sizes.

Program (u, b) owns units [u*HB, u*HB + HB) and rows [b*BB, b*BB + BB); every value of the step
is printed as register tiles [BB, HB], one per block of D (a vector of m*D entries is m tiles),
[BB, 1] for a number per row and () for a number. The tiles' sizes are constexprs the runtime
picks; D, T and the batch are runtime integers, so one compiled kernel serves every hidden size
of its bucket, every length and every batch.

The recurrent products are the only reads across units: each step, a program reads the whole
previous state of its rows from memory (the states' history, written each step) and multiplies
it by the rows of P for its units, `tl.dot` over blocks of BK (tensor cores; fp32 and fp64
exactly, `input_precision="ieee"`). The new state goes back to memory; when several programs
share rows (U = D/HB > 1), they meet at a barrier (an atomic counter per block of rows) before
the next step reads it, or the runtime launches one step at a time (the interpreter, a grid
larger than the GPU).

The backward runs the steps in reverse. Step t's adjoint reaches its states in two parts: the
pointwise part in registers, and through the products, `gz_t @ P` (gz_t the products' adjoints,
which need every unit's). So iteration t first finishes step t+1's part (reading gz_{t+1}, which
every program wrote before the barrier), then computes step t's pointwise adjoints from the saved
state and products and stores gz_t. The products' weight gradients are one GEMM over all steps
afterwards (rcc.runtime.triton.units); the params' vectors' adjoints are summed per program.
"""
from __future__ import annotations

import sympy

from rcc import ir
from rcc.codegen import dim_expr, doc_text

from ..pointwise import POINTWISE, derivatives, pointwise
from .kernel import TileExprPrinter, t_name

MASKED = "tl.where(m2, {}, 0.0)"


def _prefetched(limit, loads, dots) -> list:
    """A loop over blocks of BK along a contraction of `limit` entries: `loads` (name, load
    text reading the index vector ks and its mask kmask) one block ahead of the `dots` that
    use them, so each block's reads are in flight while the previous block multiplies. (Not
    Triton's software pipelining: its asynchronous copies may read another program's stores
    from a stale L1 line after the barrier; plain .cg reads go to L2.)"""
    lines = ["ks = tl.arange(0, BK)", f"kmask = ks < {limit}"]
    lines += [f"{name}_next = {text}" for name, text in loads]
    lines += [f"for k0 in range(0, {limit}, BK):"]
    lines += [f"    {name} = {name}_next" for name, _ in loads]
    lines += ["    ks = k0 + BK + tl.arange(0, BK)", f"    kmask = ks < {limit}"]
    lines += [f"    {name}_next = {text}" for name, text in loads]
    return lines + [f"    {d}" for d in dots]


class UnitKernelPrinter:
    def __init__(self, cell: ir.CellIR, part, layout):
        self.cell, self.part, self.lay = cell, part, layout
        self.name = t_name(cell.name) or "cell"
        self.constants = {}
        self.product = {p.node: p for p in layout.products}
        self.matrices = {part.const[p.matrix] for p in layout.products}  # their ids
        self.tag = [f"{k}_{t_name(d.name)}" for k, d in enumerate(cell.states)]
        # pointers p_*, strides of the per-step arguments {name}_st (time) and {name}_sn (row)
        self.seq_name = [f"x{k}_{self._hint(i)}" for k, i in enumerate(part.seq)]
        self.seq_ptr = [f"p_{x}" for x in self.seq_name]
        self.const_ptr = [f"p_w{k}_{self._hint(i)}" for k, i in enumerate(part.const)]
        self.diff = set()
        step = set(part.step)
        for n in cell.nodes:
            if n.id in part.seq or n.id in part.const or n.op == "state" or (
                    n.id in step and any(a in self.diff for a in n.args)):
                self.diff.add(n.id)

    def _hint(self, i):
        n = self.cell.node(i)
        return t_name(n.name or (n.attr("name") if n.op in ("input", "param", "state") else "")) or "v"

    def m(self, i) -> int:
        return self.lay.blocks[i]

    def kind(self, i) -> str:
        """'unit' (tiles [BB, HB]), 'row' ([BB, 1]) or 'one' (a number)."""
        if self.m(i):
            return "unit"
        return "row" if i in self.lay.rowwise else "one"

    def constant(self, value) -> str:
        return f"k{self.constants.setdefault(sympy.sympify(value), len(self.constants))}"

    def md(self, m) -> str:
        return "D" if m == 1 else f"{m} * D"

    # ---- values ------------------------------------------------------------------------------
    def _args(self, n, g):
        """Sympy symbols or numbers for n's arguments, their texts in block g."""
        syms, names = [], {}
        for k, a in enumerate(n.args):
            node = self.cell.node(a)
            if node.op == "const" and a not in self.value:
                value = sympy.sympify(node.attr("value"))
                if not value.free_symbols:
                    syms.append(value)
                    continue
                text = self.constant(value)
            else:
                text = self.value[a][g if self.m(a) else 0]
            s = sympy.Symbol(f"a{k}")
            syms.append(s)
            names[s.name] = text
        return syms, names

    def _node(self, n) -> list:
        """The texts of node n's blocks (one text for a scalar)."""
        op, m = n.op, self.m(n.id)
        if op in POINTWISE:
            out = []
            for g in range(max(m, 1)):
                syms, names = self._args(n, g)
                out.append(TileExprPrinter(names, self.constant).doprint(pointwise(op, syms)))
            return out
        if op == "getitem":
            lo = self.lay.slices[n.id]
            return self.value[n.args[0]][lo:lo + m]
        if op == "concat":
            return [t for a in n.args for t in self.value[a]]
        if op == "transpose":
            return self.value[n.args[0]]
        if op in ("zeros", "ones"):
            fill = "1.0" if op == "ones" else "0.0"
            return [f"tl.full((BB, HB), {fill}, ACC)"] * m if m else [f"tl.full((), {fill}, ACC)"]
        raise NotImplementedError(f"unit kernel: op {op}")  # unit_layout admits no other op

    def _root(self, v) -> list:
        n = self.cell.node(v)
        if v not in self.value:  # a number read directly
            value = sympy.sympify(n.attr("value"))
            text = self.constant(value) if value.free_symbols else TileExprPrinter({}, self.constant).doprint(value)
            return [f"({text} + tl.zeros((), ACC))"]
        return self.value[v]

    def _full(self, text) -> str:
        return f"tl.broadcast_to({text}, (BB, HB))"

    # ---- memory ------------------------------------------------------------------------------
    def _unit_tile(self, ptr, row_base, width, g) -> str:
        """Address of block g of a row-major [rows, width] slab starting at `row_base`."""
        return f"{ptr} + {row_base}r2 * ({width}) + {g} * D + u2"

    def _seq_load(self, k, i, time) -> list:
        ptr, x = self.seq_ptr[k], self.seq_name[k]
        if self.kind(i) == "row":
            return [f"tl.load({ptr} + {time} * {x}_st + rows * {x}_sn, mask=rmask, other=0.0)"
                    f".to(ACC)[:, None]"]
        return [f"tl.load({ptr} + {time} * {x}_st + r2 * {x}_sn + {g} * D + u2, mask=m2, "
                f"other=0.0).to(ACC)" for g in range(self.m(i))]

    def _hist(self, k, time) -> str:
        return f"p_hist{self.tag[k]} + (({time}) % NSLOT) * ND + r2 * D + u2"

    def _leaves(self) -> list:
        """Names of what the step reads from outside, and the lines loading the params'
        vectors and numbers (once)."""
        c, part = self.cell, self.part
        self.value = {}
        for k, d in enumerate(c.states):
            if d.name in part.state_node:
                self.value[part.state_node[d.name]] = [f"s{k}"]
        for k, i in enumerate(part.seq):
            self.value[i] = [f"x{k}_{g}" for g in range(max(self.m(i), 1))]
        pre = []
        for k, i in enumerate(part.const):
            if i in self.matrices:
                continue
            ptr = self.const_ptr[k]
            if self.m(i):
                self.value[i] = [f"w{k}_{g}" for g in range(self.m(i))]
                pre += [f"w{k}_{g} = tl.load({ptr} + {g} * D + units, mask=umask, other=0.0).to(ACC)[None, :]"
                        for g in range(self.m(i))]
            else:
                self.value[i] = [f"w{k}"]
                pre.append(f"w{k} = tl.load({ptr}).to(ACC)")
        return pre

    def _products(self, time, saved: bool) -> list:
        """Lines computing (or, `saved`, loading) the recurrent products' blocks at step `time`."""
        lines = []
        for j, p in enumerate(self.lay.products):
            self.value[p.node] = [f"z{j}_{g}" for g in range(p.m)]
            if saved:
                lines += [f"z{j}_{g} = tl.load(p_z{j} + {time} * N * ({self.md(p.m)}) + "
                          f"r2 * ({self.md(p.m)}) + {g} * D + u2, mask=m2, other=0.0)" for g in range(p.m)]
            else:
                lines += [f"z{j}_{g} = tl.zeros((BB, HB), ACC)" for g in range(p.m)]
        if saved or not self.lay.products:
            return lines
        loads, dots = [], []
        for k in sorted({p.state for p in self.lay.products}):
            loads.append((f"hk{k}", f"tl.load(p_hist{self.tag[k]} + (({time}) % NSLOT) * ND + r2 * D + "
                                    "ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0, "
                                    "cache_modifier=\".cg\")"))
        for j, p in enumerate(self.lay.products):
            w = self.const_ptr[p.matrix]
            for g in range(p.m):
                address = (f"ks[:, None] * ({self.md(p.m)}) + {g} * D + u2" if p.transposed
                           else f"({g} * D + u2) * D + ks[:, None]")
                loads.append((f"wk{j}_{g}", f"tl.load({w} + {address}, mask=kmask[:, None] & umask[None, :], "
                                            "other=0.0)"))
                dots.append(f"z{j}_{g} = tl.dot(hk{p.state}.to(DOT), wk{j}_{g}.to(DOT), z{j}_{g}, "
                            "input_precision=\"ieee\", out_dtype=ACC)")
        lines.append("# the recurrent products, over blocks of the previous states of these rows")
        return lines + _prefetched("D", loads, dots)

    def _step(self) -> list:
        lines = []
        for i in self.part.step:
            n = self.cell.node(i)
            if i in self.product:
                continue
            texts = self._node(n)
            if n.op in POINTWISE or n.op in ("zeros", "ones"):
                names = [f"v{i}_{g}" for g in range(len(texts))] if self.m(i) else [f"v{i}"]
                lines += [f"{a} = {b}" for a, b in zip(names, texts)]
                texts = names
            self.value[i] = texts
        return lines

    def _barrier(self) -> list:
        # release: this program's stores before the count; spin on plain (L2) reads, then one
        # acquire, so the next step's reads see every program's stores
        return ["tl.debug_barrier()  # this program's threads see each other's stores",
                "if SYNC:  # and every program of these rows has stored its part of the step",
                "    tl.atomic_add(p_sync + b, 1, sem=\"release\")",
                "    target = (i + 1) * tl.num_programs(0)",
                "    while tl.load(p_sync + b, volatile=True) < target:",
                "        pass",
                "    tl.atomic_add(p_sync + b, 0, sem=\"acquire\")",
                "    tl.debug_barrier()"]

    # ---- forward -----------------------------------------------------------------------------
    def forward_source(self) -> list:
        c = self.cell
        pre = self._leaves()
        pre += [f"s{k} = tl.load({self._hist(k, 't_first')}, mask=m2, other=0.0)"
                for k in range(len(c.states))]
        loop = ["t = t_first + i"]
        loop += [ln for k, i in enumerate(self.part.seq) for ln in
                 (f"{a} = {b}" for a, b in zip(self.value[i], self._seq_load(k, i, "t")))]
        loop += self._products("t", saved=False)
        for j, p in enumerate(self.lay.products):
            loop += ["if SAVE:  # the products, for the backward"]
            loop += [f"    tl.store(p_z{j} + t * N * ({self.md(p.m)}) + r2 * ({self.md(p.m)}) + {g} * D + u2, "
                     f"z{j}_{g}, mask=m2)" for g in range(p.m)]
        loop += self._step()
        for k, (name, v, _) in enumerate(c.outputs):
            loop += self._store_output(f"p_out{k}", v)
        updates = [(k, self.part.updates[d.name]) for k, d in enumerate(c.states) if d.name in self.part.updates]
        if updates:
            loop.append(f"{', '.join(f's{k}' for k, _ in updates)} = "
                        f"{', '.join(self._full(self._root(v)[0]) + '.to(ACC)' for _, v in updates)}")
        loop += [f"tl.store({self._hist(k, 't + 1')}, s{k}, mask=m2)" for k in range(len(c.states))]
        loop += self._barrier()
        args = (self._seq_args() + self.const_ptr + [f"p_hist{t}" for t in self.tag]
                + [f"p_out{k}" for k in range(len(c.outputs))]
                + [f"p_z{j}" for j in range(len(self.lay.products))] + ["p_sync"])
        doc = (f"Steps t_first .. t_first + t_count - 1 of {doc_text(c.name)} for a block of units and "
               "of rows; each step's states to the history (slot t % NSLOT), its products too when SAVE.")
        return self._kernel(f"{self.name}_forward", doc, args, ["t_first", "t_count"], ["SAVE"],
                            pre, loop, [])

    def _store_output(self, ptr, v) -> list:
        texts, m = self._root(v), self.m(v) if v in self.lay.blocks else 0
        if m:
            return [f"tl.store({ptr} + (r2 * T + t) * ({self.md(m)}) + {g} * D + u2, {x}, mask=m2)"
                    for g, x in enumerate(texts)]
        return [f"tl.store({ptr} + r2 * T + t, tl.broadcast_to({texts[0]}, (BB, 1)), "
                f"mask=rlead[:, None])"]

    def _seq_args(self) -> list:
        return [f"p_{x}, {x}_st, {x}_sn" for x in self.seq_name]

    # ---- backward ----------------------------------------------------------------------------
    def _finish_products(self, time) -> list:
        """l_k += gz_{time+1} @ P for each product of state k: the part of step time+1's
        adjoint that reaches its previous state through the products (nothing at time T-1)."""
        lines = []
        for j, p in enumerate(self.lay.products):
            w, md = self.const_ptr[p.matrix], self.md(p.m)
            address = "u2 * ({}) + ks[:, None]".format(md) if p.transposed else "ks[:, None] * D + u2"
            loads = [("gk", f"tl.load(p_gz{j} + ({time} + 1) * N * ({md}) + r2 * ({md}) + ks[None, :], "
                            "mask=rmask[:, None] & kmask[None, :], other=0.0, cache_modifier=\".cg\")"),
                     ("wk", f"tl.load({w} + {address}, mask=kmask[:, None] & umask[None, :], other=0.0)")]
            dot = (f"l{p.state} = tl.dot(gk.to(DOT), wk.to(DOT), l{p.state}, input_precision=\"ieee\", "
                   "out_dtype=ACC)")
            lines += [f"lim = tl.minimum(T - 1 - ({time}), 1) * ({md})  # nothing after the last step"]
            lines += _prefetched("lim", loads, [dot])
        return lines

    def backward_source(self) -> list:
        c, part = self.cell, self.part
        pre = self._leaves()
        acc = {}  # const index -> accumulator name (its adjoint over this program's steps)
        for k, i in enumerate(part.const):
            if i in self.diff and i not in self.matrices:
                acc[i] = f"dw{k}"  # stored through p_dw{k}
                pre.append(f"dw{k}_0 = tl.zeros((BB, HB), ACC)" if self.m(i) else f"dw{k} = tl.zeros((), ACC)")
                if self.m(i):
                    pre += [f"dw{k}_{g} = tl.zeros((BB, HB), ACC)" for g in range(1, self.m(i))]
        pre += [f"l{k} = tl.load(p_ladj{self.tag[k]} + r2 * D + u2, mask=m2, other=0.0)"
                for k in range(len(c.states))]
        loop = ["t = t_first - i"]
        loop += self._finish_products("t")
        loop += [f"s{k} = tl.load({self._hist(k, 't')}, mask=m2, other=0.0)" for k in range(len(c.states))]
        loop += [ln for k, i in enumerate(part.seq) for ln in
                 (f"{a} = {b}" for a, b in zip(self.value[i], self._seq_load(k, i, "t")))]
        loop += self._products("t", saved=True)
        loop += self._step()
        self.adj, self.acc = {}, acc
        loop.append("# adjoints, from the outputs and next states back to the step's arguments")
        for k, (name, v, _) in enumerate(c.outputs):
            if v in self.diff:
                loop += self._add(v, self._gout(k, v), "unit" if self.m(v) else "row")
        for k, d in enumerate(c.states):
            v = part.updates.get(d.name)
            if v is not None and v in self.diff:
                loop += self._add(v, f"l{k}", "unit")
        for i in sorted(set(part.step), reverse=True):
            if i in self.adj and i not in self.product:
                loop += self._propagate(c.node(i))
        for j, p in enumerate(self.lay.products):
            g = self.adj.get(p.node, ["tl.zeros((BB, HB), ACC)"] * p.m)
            loop += [f"tl.store(p_gz{j} + t * N * ({self.md(p.m)}) + r2 * ({self.md(p.m)}) + {b} * D + u2, "
                     f"{g[b]}, mask=m2)" for b in range(p.m)]
        for k, i in enumerate(part.seq):
            if i in self.adj:
                loop += self._store_seq_adjoint(k, i)
        for k, d in enumerate(c.states):
            leaf = part.state_node.get(d.name)
            if d.name not in part.updates:
                if leaf in self.adj:
                    loop.append(f"l{k} += {self._full(self.adj[leaf][0])}")
            elif leaf in self.adj:
                loop.append(f"l{k} = {self._full(self.adj[leaf][0])}")
            else:
                loop.append(f"l{k} = tl.zeros((BB, HB), ACC)")
        loop += self._barrier()
        post = []
        if self.lay.products:
            post = ["if finish:  # the products' part of the first step's adjoint: the initial states'"]
            post += ["    " + ln for ln in self._finish_products("t_first - t_count")]
        post += [f"tl.store(p_ladj{self.tag[k]} + r2 * D + u2, l{k}, mask=m2)" for k in range(len(c.states))]
        for i, name in acc.items():
            k = part.const.index(i)
            if self.m(i):
                for g in range(self.m(i)):
                    at = f"p_dw{k} + b * ({self.md(self.m(i))}) + {g} * D + units"
                    post.append(f"tl.store({at}, tl.load({at}, mask=umask, other=0.0) + "
                                f"tl.sum({MASKED.format(f'{name}_{g}')}, 0), mask=umask)")
            else:
                at = f"p_dw{k} + b * tl.num_programs(0) + u"
                post.append(f"tl.store({at}, tl.load({at}) + {name})")
        args = (self._seq_args() + self.const_ptr + [f"p_hist{t}" for t in self.tag]
                + [f"p_z{j}" for j in range(len(self.lay.products))]
                + [f"p_gout{k}, gout{k}_st, gout{k}_sn" for k in range(len(c.outputs))]
                + [f"p_ladj{t}" for t in self.tag]
                + [f"p_gz{j}" for j in range(len(self.lay.products))]
                + [f"p_d{x}" for x in self.seq_name]
                + [f"p_dw{k}" for k, i in enumerate(part.const) if i in acc] + ["p_sync"])
        doc = (f"Steps t_first down to t_first - t_count + 1 of {doc_text(c.name)} in reverse for a block "
               "of units and of rows; the states' adjoints carried in p_ladj, the products' in p_gz.")
        return self._kernel(f"{self.name}_backward", doc, args, ["t_first", "t_count", "finish"], [],
                            pre, loop, post)

    def _gout(self, k, v) -> str:
        if self.m(v):
            return [f"tl.load(p_gout{k} + t * gout{k}_st + r2 * gout{k}_sn + {g} * D + u2, mask=m2, "
                    f"other=0.0).to(ACC)" for g in range(self.m(v))]
        # a number per row: program u == 0 alone adds it (every program computes it)
        return [f"tl.load(p_gout{k} + t * gout{k}_st + rows * gout{k}_sn, mask=rlead, "
                f"other=0.0).to(ACC)[:, None]"]

    def _store_seq_adjoint(self, k, i) -> list:
        g, ptr = self.adj[i], f"p_d{self.seq_name[k]}"
        if self.kind(i) == "row":  # this program's units' part: [U, T, N], summed by the runtime
            return [f"tl.store({ptr} + (u * T + t) * N + rows, tl.sum(tl.broadcast_to({g[0]}, (BB, 1)), 1), mask=rmask)"]
        return [f"tl.store({ptr} + t * N * ({self.md(self.m(i))}) + r2 * ({self.md(self.m(i))}) + "
                f"{b} * D + u2, {g[b]}, mask=m2)" for b in range(self.m(i))]

    def _add(self, i, texts, from_kind) -> list:
        """Add `texts` (the blocks of an adjoint of kind `from_kind`) into value i's adjoint,
        summed down to i's kind first."""
        if isinstance(texts, str):
            texts = [texts]
        to = self.kind(i)
        if to == "unit":
            return [ln for b, x in enumerate(texts) for ln in self._add_block(i, b, x)]
        if from_kind != to:
            if from_kind == "unit":
                axis = ", 1, keep_dims=True" if to == "row" else ""
                texts = [f"tl.sum({MASKED.format(x)}{axis})" for x in texts]
            else:  # row -> one
                texts = [f"tl.sum(tl.where(rmask[:, None], {x}, 0.0))" for x in texts]
        text = " + ".join(f"({x})" for x in texts) if len(texts) > 1 else texts[0]
        if i in self.acc:
            return [f"{self.acc[i]} += {text}"]
        if i in self.adj:
            return [f"{self.adj[i][0]} += {text}"]
        self.adj[i] = [f"g{i}"]
        return [f"g{i} = {text}"]

    def _add_block(self, i, b, text) -> list:
        """Add `text` into block b of vector i's adjoint (all its blocks start at zero)."""
        if i in self.acc:
            return [f"{self.acc[i]}_{b} += {text}"]
        lines = []
        if i not in self.adj:
            self.adj[i] = [f"g{i}_{g}" for g in range(self.m(i))]
            lines = [f"{x} = tl.zeros((BB, HB), ACC)" for x in self.adj[i]]
        return lines + [f"{self.adj[i][b]} += {text}"]

    def _propagate(self, n) -> list:
        g, op, lines = self.adj[n.id], n.op, []
        kind = self.kind(n.id)
        if op in POINTWISE:
            y = sympy.Symbol("y_")
            for b in range(max(self.m(n.id), 1)):
                syms, names = self._args(n, b)
                names["y_"] = self.value[n.id][b if self.m(n.id) else 0]
                parts = derivatives(op, syms, y)
                for k, a in enumerate(n.args):
                    if a not in self.diff or parts[k] == 0:
                        continue
                    d = parts[k]
                    text = g[b] if d == 1 else f"-{g[b]}" if d == -1 else \
                        f"{g[b]} * ({TileExprPrinter(names, self.constant).doprint(d)})"
                    if self.m(a):
                        lines += self._add_block(a, b, text)
                    else:
                        lines += self._add(a, text, kind)
            return lines
        a = n.args[0]
        if a not in self.diff:
            return lines
        if op == "getitem":
            lo = self.lay.slices[n.id]
            for b in range(self.m(n.id)):
                lines += self._add_block(a, lo + b, g[b])
        elif op == "concat":
            at = 0
            for part in n.args:
                for b in range(self.m(part)):
                    if part in self.diff:
                        lines += self._add_block(part, b, g[at + b])
                at += self.m(part)
        elif op == "transpose":
            lines += self._add(a, g, kind)
        return lines

    # ---- rendering ---------------------------------------------------------------------------
    def _kernel(self, name, doc, args, runtime, flags, pre, loop, post):
        return lambda: self._render(name, doc, args, runtime, flags, pre, loop, post)

    def _render(self, name, doc, args, runtime, flags, pre, loop, post):
        header = [f'"""{doc}"""',
                  "u = tl.program_id(0)  # the block of units this program owns",
                  "b = tl.program_id(1)  # and of rows (batch x head)",
                  "rows = b * BB + tl.arange(0, BB)",
                  "units = u * HB + tl.arange(0, HB)",
                  "rmask = rows < N",
                  "umask = units < D",
                  "r2 = rows[:, None]",
                  "u2 = units[None, :]",
                  "m2 = rmask[:, None] & umask[None, :]",
                  "rlead = rmask & (rows * 0 + u == 0)  # program u = 0 stores what every u computes",
                  "ND = N * D  # one step of a state's history"]
        header += [f"k{k} = tl.full((), K{k}, ACC)" for k in self.constants.values()]
        ints = runtime + ["NSLOT", "T", "N", "D"]
        constexprs = flags + ["SYNC", "ACC", "DOT", "BB", "HB", "BK"] + [f"K{k}" for k in self.constants.values()]
        sig = [f"    {a}," for a in args] + [f"    {', '.join(ints)},"]
        sig += [f"    {', '.join(f'{x}: tl.constexpr' for x in constexprs[i:i + 4])},"
                for i in range(0, len(constexprs), 4)]
        body = header + list(pre) + ["for i in range(t_count):"] + ["    " + ln for ln in loop] + list(post)
        # a new length, first step or batch never recompiles; D and the strides are specialized
        # (Triton: divisible by 16 or not), which lets the loads along units be vectors
        quoted = ", ".join(f'"{x}"' for x in runtime + ["NSLOT", "T", "N"])
        return [f"@triton.jit(do_not_specialize=[{quoted}])", f"def {name}(", *sig, "):",
                *["    " + ln for ln in body]]

    def source(self) -> str:
        forward, backward = self.forward_source(), self.backward_source()
        return "\n".join(forward() + ["", ""] + backward()) + "\n"

    def meta_source(self, name) -> list:
        names = {d.name: f"dims[{d.name!r}]" for d in self.cell.dims}
        lines = [f"def {name}(dims):",
                 '    """The kernels\' hidden size D (a runtime integer) and numbers K (constexprs)."""',
                 f"    meta = {{'D': {dim_expr(self.lay.D, names)}}}"]
        for value, k in self.constants.items():
            number = dim_expr(value, names) if value.free_symbols else repr(float(value))
            lines.append(f"    meta['K{k}'] = float({number})")
        lines.append("    return meta")
        return lines

    def spec(self) -> dict:
        """What the runtime needs to know of the kernels' arguments."""
        part = self.part
        return {
            "seq": [self.m(i) for i in part.seq],
            "const": [None if i in self.matrices else self.m(i) for i in part.const],
            "diff_const": [i in self.diff and i not in self.matrices for i in part.const],
            "out": [self.m(v) if v in self.lay.blocks else 0 for _, v, _ in self.cell.outputs],
            "products": [(p.matrix, p.state, p.transposed, p.m) for p in self.lay.products],
        }
