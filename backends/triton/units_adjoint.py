"""The backward kernel of the loop tiled over units (units.py): step t's adjoint, node by node,
from the outputs' gradients and the next states' adjoints back to the step's arguments.

Adjoints have the kind of their value: 'unit' ([BB, HB] tiles, one per block), 'row' ([BB, 1])
or 'one' (a number). A contribution from a wider kind is summed down first, over this program's
units (masked): a number per row or a param number gets this program's part, which the runtime
sums over programs (the adjoint is linear in those parts). The params' adjoints are summed over
the steps in registers and stored per program.
"""
from __future__ import annotations

import sympy

from rcc.codegen import doc_text

from ..pointwise import POINTWISE, derivatives
from .kernel import TileExprPrinter

MASKED = "tl.where(m2, {}, 0.0)"


def prefetched(limit, loads, dots) -> list:
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


class UnitAdjoints:
    """Mixed into UnitKernelPrinter: its backward kernel."""

    def _finish_products(self, time) -> list:
        """l_k += gz_{time+1} @ P for each product of state k: the part of step time+1's
        adjoint that reaches its previous state through the products (nothing at time T-1)."""
        lines = []
        for j, p in enumerate(self.lay.products):
            w, md = self.const_ptr[p.matrix], self.md(p.m)
            address = "u2 * ({}) + ks[:, None]".format(md) if p.transposed else "ks[:, None] * D + u2"
            loads = [("gk", f"tl.load({self._slab(f'p_gz{j}', f'{time} + 1', p.m, 'ks[None, :]')}, "
                            "mask=rmask[:, None] & kmask[None, :], other=0.0, cache_modifier=\".cg\")"),
                     ("wk", f"tl.load({w} + {address}, mask=kmask[:, None] & umask[None, :], other=0.0)")]
            dot = (f"l{p.state} = tl.dot(gk.to(DOT), wk.to(DOT), l{p.state}, input_precision=\"ieee\", "
                   "out_dtype=ACC)")
            lines += [f"lim = tl.minimum(T - 1 - ({time}), 1) * ({md})  # nothing after the last step"]
            lines += prefetched("lim", loads, [dot])
        return lines

    def backward_source(self) -> list:
        c, part = self.cell, self.part
        pre = self._leaves()
        acc = {}  # const index -> accumulator name (its adjoint over this program's steps)
        for k, i in enumerate(part.const):
            if i in self.diff and i not in self.matrices:
                acc[i] = f"dw{k}"  # stored through p_dw{k}
                if self.m(i):
                    pre += [f"dw{k}_{g} = tl.zeros((BB, HB), ACC)" for g in range(self.m(i))]
                else:
                    pre.append(f"dw{k} = tl.zeros((), ACC)")
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
            loop += [f"tl.store({self._slab(f'p_gz{j}', 't', p.m, f'{b} * D + u2')}, {g[b]}, mask=m2)"
                     for b in range(p.m)]
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
            total = f"tl.sum(tl.broadcast_to({g[0]}, (BB, 1)), 1)"
            return [f"tl.store({ptr} + (u * T + t) * N + rows, {total}, mask=rmask)"]
        return [f"tl.store({self._slab(ptr, 't', self.m(i), f'{b} * D + u2')}, {g[b]}, mask=m2)"
                for b in range(self.m(i))]

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

