"""AST -> typed IR: resolve names, inline fns, unroll loops, infer and check shapes.

Shapes are symbolic in the dims, so one IR (and one generated module) serves every dim value.
A dim used where an integer is required (a loop bound, a split count) must have a value now:
`elaborate` asks for it through `static` and reports which dims it needed.
"""
from __future__ import annotations

import dataclasses
import keyword
import sys
from dataclasses import dataclass
from typing import Optional

import sympy

from . import ir
from . import syntax as S
from .builder import GraphBuilder, fmt_number
from .components import ComponentElaboration
from .errors import CompileError, Span
from .passes.generalize import generalize, literal_sizes, remember
from .shapes import broadcast, fmt_shape, same_dim


class NeedStatic(Exception):
    """Raised when an integer context needs a dim value not given yet (caught by the driver)."""

    def __init__(self, names, span):
        super().__init__(names)
        self.names = tuple(sorted(names))
        self.span = span


@dataclass(frozen=True)
class Sym:
    """A compile-time integer expression (literal, loop variable or dim expression)."""
    expr: sympy.Expr


@dataclass(frozen=True)
class Val:
    """A run-time value: an IR node id."""
    id: int


@dataclass(frozen=True)
class Multi:
    """Several values (the result of split/chunk), only legal on the right of a destructuring."""
    ids: tuple


_UNARY_FUNCS = {name for name in ir.UNARY if name != "neg"}
_BINARY_FUNCS = {"max": "maximum", "min": "minimum", "logaddexp": "logaddexp"}
_REDUCE_FUNCS = set(ir.REDUCE)
_SHAPE_FUNCS = {"softmax", "dot", "outer", "l2norm", "eye", "zeros", "ones", "concat", "stack",
                "split", "chunk", "where"}
_PRED_FUNCS = {"sum_pred": "sum", "mean_pred": "mean", "max_pred": "max", "pred": "index"}
BUILTINS = _UNARY_FUNCS | set(_BINARY_FUNCS) | _REDUCE_FUNCS | _SHAPE_FUNCS | set(_PRED_FUNCS)
# The edge slot of the row, legal only as an index: T[out_slot, in_slot] (LANGUAGE.md section 8)
SLOT_NAMES = {"in_slot": "in", "out_slot": "out"}
_COMPARE = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
_ARITH = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow"}
_INITS = {"zeros", "ones", "eye", "xavier", "orthogonal"}
# Names the generated module's Python signatures already use: Cell(**dims), m(*inputs, keywords)
_RESERVED_DIMS = {"self": "it would clash with the module's own 'self'",
                  "cls": "it would clash with the module class's 'cls'"}
_RESERVED_INPUTS = {"self": "m(self=x) would clash with the module's own 'self'",
                    "edge_index": "it is the keyword for a graph: m(x, edge_index=...)",
                    "initial_state": "it is the keyword for the initial states: m(x, initial_state=...)",
                    "output_final_state": "it is the keyword that drops the final states: "
                                          "m(x, output_final_state=False)",
                    "cu_seqlens": "it is the keyword for packed sequences: m(x, cu_seqlens=...)",
                    "lengths": "it is the keyword for a padded batch's lengths: m(x, lengths=...)"}
# Bounds that turn typos (`for j in 0..1000000000`, `split(x, 10**9)`) into errors, not hangs.
MAX_UNROLL = 16384  # loop iterations unrolled in one cell, and parts of one split()
MAX_AXIS = 2 ** 63 - 1  # a tensor axis size must fit in int64
# fn calls nest at most this deep (each level is some 8 Python frames of elaboration, each
# expression level of a body 3: elaboration runs with room for both)
MAX_INLINE_DEPTH = 512
MAX_INLINED = 16384  # fn calls inlined in one cell (`fn g(a) = f(a) + f(a)` doubles them)
_RECURSION_LIMIT = 10000
_RANDOM_INITS = {"uniform", "normal", "xavier", "orthogonal", "default"}


class Elaborator(ComponentElaboration, GraphBuilder):
    def __init__(self, cell: S.Cell, fns: dict, static: dict):
        self.cell = cell
        self.origins: list = []  # per node: the outermost fn call that made it (CellIR.origins)
        self.fns = fns  # name -> S.FnDef
        self.static = dict(static)  # dim name -> int, for integer contexts
        super().__init__()
        self.env: dict = {}  # name -> Sym | Val
        self.decls: dict = {}  # name -> ir.Decl
        self.decl_order: list = []
        self.state_inits: dict = {}  # state name -> (param name, span)
        self.updated: dict = {}  # state name -> node id
        self.update_spans: dict = {}  # state name -> span of its `s' = ...`
        self.outputs: list = []
        self.constraints: list = []
        # dim expressions constraints make integers (a split part d/2): floor(x) == x for them
        self.exact: set = set()
        # (fn name, call span) while inlining; not `call_stack`, which is the stack() builtin
        self.inline_stack: list = []
        self.unrolled = 0  # loop iterations unrolled so far, against MAX_UNROLL
        self.inlined = 0  # fn calls inlined so far, against MAX_INLINED
        self.caller_env: set = set()  # while inlining: the names bound by the fn's callers
        self.block_names: list = []  # the names each block fn being run declares, innermost last
        self.fn_uses: dict = {}  # block fn name -> uses so far (names each use's states)
        self.state_leaf: dict = {}  # state name -> the id of its declaration's node
        # the predecessor forms being elaborated, innermost last: (scope id, agg, k)
        self.scopes: list = []
        self.n_scopes = 0
        self.dims = {}
        for d in cell.dims:
            if d.name in self.dims:
                raise CompileError(f"dim '{d.name}' is declared twice", d.span)
            if d.name in _RESERVED_DIMS:
                raise CompileError(f"a dim cannot be named '{d.name}' ({_RESERVED_DIMS[d.name]})",
                                   d.span)
            if d.default is not None and d.default <= 0:
                raise CompileError(f"dim '{d.name}' must be a positive integer, got {d.default}",
                                   d.span)
            self.dims[d.name] = d
            self.env[d.name] = Sym(ir.dim_symbol(d.name))

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> ir.CellIR:
        if self.cell.topology not in ir.TOPOLOGIES:
            raise CompileError(f"unknown topology '{self.cell.topology}' (expected seq, grid2d "
                               "or dag)", self.cell.topology_span or self.cell.span)
        self.block(self.cell.body)
        kinds = {k: tuple(self.decls[n] for n in self.decl_order if self.decls[n].kind == k)
                 for k in ("input", "param", "state")}
        if not kinds["input"]:
            raise CompileError(f"cell '{self.cell.name}' has no input: declare at least one "
                               "(the sequence length comes from the inputs)", self.cell.span)
        states = tuple(self._resolve_state_init(d) for d in kinds["state"])
        dims = tuple(ir.Dim(d.name, d.default, d.span, self.static.get(d.name))
                     for d in self.cell.dims)
        return ir.CellIR(
            name=self.cell.name, filename=self.cell.span.filename, topology=self.cell.topology,
            dims=dims, inputs=kinds["input"], params=kinds["param"], states=states,
            nodes=tuple(self.nodes), updates=tuple(self.updated.items()),
            outputs=tuple(self.outputs), constraints=tuple(self.constraints), span=self.cell.span,
            origins=tuple(self.origins))

    def _resolve_state_init(self, decl: ir.Decl) -> ir.Decl:
        if decl.name not in self.state_inits:
            return decl
        pname, span = self.state_inits[decl.name]
        p = self.decls.get(pname)
        if p is None or p.kind != "param":
            raise CompileError(f"unknown initializer '{pname}' for state '{decl.name}' (expected "
                               "0, a number, zeros, ones, eye or the name of a param)", span)
        return dataclasses.replace(decl, init=self._param_init(decl, decl.shape, pname, span))

    def _param_init(self, state, shape, pname, span) -> ir.Init:
        p = self.decls[pname]
        if not _same_shape(p.shape, shape):
            raise CompileError(f"shape mismatch: state '{state.name}' is {fmt_shape(shape)} "
                               f"but its initial param '{pname}' is {fmt_shape(p.shape)}", span)
        return ir.Init("param", param=pname)

    # ---- building nodes -------------------------------------------------------------------
    def emit(self, op, args, shape, span, attrs=(), batched=None) -> int:
        new = len(self.nodes)
        vid = super().emit(op, args, shape, span, attrs, batched)
        if vid == new:
            self.origins.append(self.inline_stack[0][1] if self.inline_stack else None)
        return vid

    def name_value(self, vid: int, name: str):
        n = self.nodes[vid]
        if not n.name and n.op not in ("input", "param", "state", "const"):
            self.nodes[vid] = ir.Node(n.id, n.op, n.args, n.attrs, n.type, n.span, name)

    def _what(self, name) -> str:
        """How to call a name in a message: "input 'x'", "dim 'd'", "local value 'a'"."""
        if name in self.decls:
            return f"{self.decls[name].kind} '{name}'"
        if name in self.dims:
            return f"dim '{name}'"
        if any(name == n for n, _ in self.inline_stack) or name in self.fns:
            return f"fn '{name}'"
        return f"local value '{name}'" if name in self.env else f"'{name}'"

    # ---- statements -----------------------------------------------------------------------
    def block(self, stmts):
        for st in stmts:
            getattr(self, "stmt_" + type(st).__name__)(st)

    def stmt_Decl(self, st: S.Decl):
        for item in st.items:
            self.declare(item)

    def declare(self, item: S.DeclItem):
        if item.name in self.decls:
            raise CompileError(f"'{item.name}' is declared twice", item.span)
        if item.name in self.dims:
            raise CompileError(f"'{item.name}' is already a dim of cell '{self.cell.name}'",
                               item.span)
        if item.name in self.env:
            raise CompileError(f"'{item.name}' is already bound to a value", item.span)
        if item.name == "None":
            raise CompileError("'None' is reserved: it is the new axis in an index", item.span)
        if item.kind == "param" and keyword.iskeyword(item.name):
            raise CompileError(f"a param cannot be named '{item.name}': params are attributes "
                               f"of the module, and m.{item.name} is not valid Python", item.span)
        if item.kind == "input" and item.name in _RESERVED_INPUTS:
            raise CompileError(f"an input cannot be named '{item.name}' "
                               f"({_RESERVED_INPUTS[item.name]})", item.span)
        if len(item.shape) > 3:
            raise CompileError(f"'{item.name}' has rank {len(item.shape)}; ranks 0 to 3 are "
                               "supported", item.span)
        shape = tuple(self.shape_dim(e, f"axis {i} of '{item.name}'")
                      for i, e in enumerate(item.shape))
        init = self.initializer(item, shape)
        decl = ir.Decl(item.kind, item.name, shape, init, item.span, self._place(item))
        self.decls[item.name] = decl
        self.decl_order.append(item.name)
        vid = self.emit(item.kind, (), shape, item.span, (("name", item.name),))
        self.env[item.name] = Val(vid)
        if item.kind == "state":
            self.state_leaf[item.name] = vid

    def _place(self, item: S.DeclItem) -> str:
        """Where a state lives over a graph: `state C[...] over edges` puts one on every edge."""
        if item.over is None:
            return "nodes"
        place, where = item.over
        if item.kind != "state":
            raise CompileError(f"only states live on edges; {item.kind} '{item.name}' belongs "
                               "to a node (drop 'over')", where)
        if place not in ("edges", "nodes"):
            raise CompileError(f"a state lives over 'edges' or 'nodes', not '{place}'", where)
        if place == "edges" and self.cell.topology == "seq":
            raise CompileError(f"state '{item.name}' lives on edges, but cell "
                               f"'{self.cell.name}' runs over seq, where each step has one "
                               "edge: declare it without 'over edges', or run the cell over "
                               "grid2d or dag", where)
        return place

    def shape_dim(self, expr, what) -> sympy.Expr:
        where = _full_span(expr)
        for name in _names_in(expr):
            if name.id not in self.env and name.id != "None":
                dims = ", ".join(self.dims) or "none"
                raise CompileError(f"unknown dim '{name.id}' in {what} (dims of cell "
                                   f"'{self.cell.name}': {dims})", name.span)
        v = self.eval_any(expr)
        if not isinstance(v, Sym):
            raise CompileError(f"{what} must be an integer expression of dims", where)
        e = sympy.expand(v.expr)
        if e.is_number:
            if not (e.is_integer and e > 0):
                raise CompileError(f"{what} is {e}; it must be a positive integer", where)
            if e > MAX_AXIS:
                raise CompileError(f"{what} is too large for a tensor axis", where)
        elif not (e.is_integer and e.is_positive):
            self.constraints.append(ir.Constraint(e, what, where))
        return e

    def initializer(self, item: S.DeclItem, shape) -> ir.Init:
        e = item.init
        if e is None:
            return ir.Init("default" if item.kind == "param" else "zeros")
        where = _span(e)
        if item.kind == "input":
            raise CompileError(f"input '{item.name}' cannot have an initial value", where)
        bound = self.env.get(e.id) if isinstance(e, S.Name) else None
        if isinstance(bound, Val) and self.nodes[bound.id].op == "param" and item.kind == "state":
            # a param in scope (in a block fn, the one its parameter is bound to)
            return self._param_init(item, shape, self.nodes[bound.id].attr("name"), where)
        if isinstance(e, S.Name) and e.id in _INITS:
            kind = e.id
        elif isinstance(e, S.Name) and item.kind == "state" and bound is None \
                and e.id not in self.dims and e.id != "pi":
            if self.block_names and e.id not in self.block_names[-1]:
                raise CompileError(f"unknown initializer '{e.id}' (a block fn's state starts "
                                   "from a number, an expression of its parameters and dims, or "
                                   "a param it declares or is given)", where)
            self.state_inits[item.name] = (e.id, where)  # a param declared further on
            return ir.Init("zeros")  # replaced once the param is known
        elif isinstance(e, S.Call) and e.func in ("uniform", "normal"):
            if len(e.args) != 2 or e.kwargs:
                raise CompileError(f"{e.func}() takes 2 arguments, got {len(e.args)}", where)
            a, b = (self.const_expr(x) for x in e.args)
            # torch.nn.init refuses these when the module is built; say so now
            _fits_float32(e.func, (a, b, b - a), where)
            if e.func == "uniform" and (b - a).is_negative:
                raise CompileError(f"uniform(a, b) needs a <= b, got uniform({a}, {b})", where)
            if e.func == "normal" and b.is_negative:
                raise CompileError(f"normal(mean, std) needs std >= 0, got {b}", where)
            return self._random_ok(item, e.func, (a, b), where)
        elif isinstance(e, S.Name) and bound is None and e.id not in self.dims \
                and e.id != "pi":  # a dim, a bound value and pi are numbers
            raise CompileError(f"unknown initializer '{e.id}' (expected 0, a number, zeros, "
                               "ones, eye, uniform(a, b), normal(mean, std), xavier, orthogonal)",
                               where)
        else:
            v = self.eval_any(e)
            if item.kind == "state" and isinstance(v, Val) and self.const_value(v.id) is None:
                return self._initial_values(item, shape, v.id, where)
            value = self.const_expr(e)
            _fits_float32("the initial value", (value,), where)
            return ir.Init("zeros") if value == 0 else ir.Init("const", (value,))
        if kind in ("eye", "xavier", "orthogonal") and len(shape) != 2:
            raise CompileError(f"initializer {kind} needs a rank-2 shape, '{item.name}' is "
                               f"{fmt_shape(shape)}", where)
        return self._random_ok(item, kind, (), where)

    def _random_ok(self, item, kind, args, where):
        if item.kind == "state" and kind in _RANDOM_INITS | {"uniform", "normal"}:
            raise CompileError(f"state '{item.name}' cannot start from a random initializer "
                               f"({kind}); use a param: state {item.name}[...] = P", where)
        return ir.Init(kind, args)

    def const_expr(self, e):
        v = self.eval_any(e)
        if isinstance(v, Sym):
            return self.const_value(self.const(v.expr, _span(e)))  # checks that it is finite
        if isinstance(v, Val) and self.const_value(v.id) is not None:
            return self.const_value(v.id)
        raise CompileError("an initializer argument must be a constant expression", _span(e))

    def stmt_Assign(self, st: S.Assign):
        self._check_assignable(st.target, st.span)
        v = self.eval_any(st.value)
        if isinstance(v, Multi):
            raise CompileError(f"{_call_name(st.value)} gives {len(v.ids)} values; unpack them: "
                               f"a, b = ...", _span(st.value))
        if isinstance(v, Val):
            self.name_value(v.id, st.target)
        self.env[st.target] = v

    def _check_assignable(self, name, span):
        if name == "None":
            raise CompileError("cannot assign to 'None': it is the new axis in an index", span)
        if name in self.decls:
            kind = self.decls[name].kind
            hint = f"; write {name}' = ... for its next value" if kind == "state" else ""
            raise CompileError(f"cannot assign to {kind} '{name}'{hint}", span)
        if name in self.dims:
            raise CompileError(f"cannot assign to dim '{name}'", span)
        if name in BUILTINS or name in self.fns:
            raise CompileError(f"cannot assign to '{name}': it names a function", span)

    def stmt_Destructure(self, st: S.Destructure):
        v = self.eval_any(st.value)
        if not isinstance(v, Multi):
            raise CompileError(f"only split(...) and chunk(...) can be unpacked into "
                               f"{len(st.targets)} names", _span(st.value))
        if len(v.ids) != len(st.targets):
            raise CompileError(f"{_call_name(st.value)} gives {len(v.ids)} values but "
                               f"{len(st.targets)} names are bound", st.span)
        for t, vid in zip(st.targets, v.ids):
            self._check_assignable(t.id, t.span)
            self.name_value(vid, t.id)
            self.env[t.id] = Val(vid)

    def _visible_state(self, name) -> bool:
        """Whether state `name` is in scope here: a block fn sees only its own states, an
        expression fn none, the cell its own."""
        return name in self.state_leaf and self.env.get(name) == Val(self.state_leaf[name])

    def stmt_Update(self, st: S.Update):
        if st.state in self.decls and not self._visible_state(st.state) and self.inline_stack:
            raise CompileError(f"fn '{self.inline_stack[-1][0]}' cannot update state "
                               f"'{st.state}': a block fn updates only the states it declares",
                               st.span)
        decl = self.decls.get(st.state)
        if decl is None and st.state not in self.env:
            raise CompileError(f"unknown state '{st.state}' (declare it first: "
                               f"state {st.state}[...])", st.span)
        if decl is None or decl.kind != "state":
            what = f"{decl.kind} '{st.state}'" if decl else self._what(st.state)
            raise CompileError(f"{what} is not a state; only states can be primed", st.span)
        if st.state in self.updated:
            prev = self.update_spans[st.state]
            raise CompileError(f"state '{st.state}' is updated twice (first at line {prev.line})",
                               st.span, notes=(("first updated here", prev),))
        vid = self.materialize(self.value(st.value), st.span)
        got = self.shape(vid)
        if not _same_shape(got, decl.shape):
            raise CompileError(f"shape mismatch: state '{st.state}' is {fmt_shape(decl.shape)} "
                               f"but its update is {fmt_shape(got)}", st.span)
        self.updated[st.state] = vid
        self.update_spans[st.state] = st.span

    def stmt_Output(self, st: S.Output):
        if any(name == st.name for name, _, _ in self.outputs):
            raise CompileError(f"output '{st.name}' is declared twice", st.span)
        if st.value is None:
            vid = self.value(S.Primed(st.name, st.span))
        else:
            vid = self.value(st.value)
        self.outputs.append((st.name, self.materialize(vid, st.span), st.span))

    def stmt_For(self, st: S.For):
        start, stop = self.int_value(st.start), self.int_value(st.stop)
        if st.var in self.decls or st.var in self.dims or st.var == "None":
            raise CompileError(f"loop variable '{st.var}' shadows a declared name", st.span)
        self.unrolled += max(0, stop - start)
        if self.unrolled > MAX_UNROLL:
            raise CompileError(f"loops unroll to more than {MAX_UNROLL} iterations in all (this "
                               f"one has {stop - start}); a cell this large is surely a mistake",
                               _span(st.stop))
        saved = self.env.get(st.var)
        for j in range(start, stop):
            self.env[st.var] = Sym(sympy.Integer(j))
            self.block(st.body)
        if saved is None:
            self.env.pop(st.var, None)
        else:
            self.env[st.var] = saved

    # ---- expressions ----------------------------------------------------------------------
    def value(self, e) -> int:
        return self.to_value(self.eval_any(e), e)

    def to_value(self, v, e) -> int:
        if isinstance(v, Val):
            return v.id
        if isinstance(v, Sym):
            return self.const(v.expr, _span(e))
        raise CompileError(f"{_call_name(e)} gives {len(v.ids)} values; unpack them first: "
                           "a, b = ...", _span(e))

    def int_value(self, e) -> int:
        v = self.eval_any(e)
        if not isinstance(v, Sym):
            raise CompileError("expected an integer (a literal, a dim or a loop variable)",
                               _span(e))
        expr = sympy.expand(v.expr.subs({ir.dim_symbol(k): n for k, n in self.static.items()}))
        free = {s.name for s in expr.free_symbols}
        if free:
            raise NeedStatic(free, _span(e))
        return int(expr)

    def eval_any(self, e):
        method = getattr(self, "ex_" + type(e).__name__, None)
        if method is None:
            raise CompileError("unsupported expression", _span(e))
        return method(e)

    def ex_Num(self, e: S.Num):
        return Sym(sympy.Integer(e.value)) if e.is_int else Val(self.const(e.value, e.span))

    def ex_Name(self, e: S.Name):
        if e.id in self.state_leaf and self.env.get(e.id) == Val(self.state_leaf[e.id]) \
                and self.cell.topology != "seq":
            return Val(self._predecessor_state(e))
        if e.id in self.env:
            return self.env[e.id]
        if e.id in SLOT_NAMES:
            raise CompileError(f"'{e.id}' is an edge slot: use it as an index (M[in_slot], "
                               "T[out_slot, in_slot])", e.span)
        if e.id == "None":
            raise CompileError("None is only allowed inside an index, as a new axis", e.span)
        if e.id == "pi":
            return Val(self.const(sympy.pi, e.span))
        if e.id in self.fns or e.id in BUILTINS:
            raise CompileError(f"function '{e.id}' must be called", e.span)
        hint = " (an fn sees only its parameters and the cell's dims)" if self.inline_stack else ""
        raise CompileError(f"unknown name '{e.id}'{hint}", e.span)

    def ex_Primed(self, e: S.Primed):
        if e.id in self.decls and self.inline_stack and not self._visible_state(e.id):
            raise CompileError(f"fn '{self.inline_stack[-1][0]}' cannot read {e.id}': an fn "
                               "sees its parameters, the dims and the states it declares", e.span)
        decl = self.decls.get(e.id)
        if decl is None:
            if e.id in self.env or e.id in self.dims:
                raise CompileError(f"{self._what(e.id)} is not a state; only states can be "
                                   "primed", e.span)
            raise CompileError(f"unknown name '{e.id}'", e.span)
        if decl.kind != "state":
            raise CompileError(f"{decl.kind} '{e.id}' is not a state; only states can be primed",
                               e.span)
        if e.id not in self.updated:
            raise CompileError(f"{e.id}' is used before its update: the statement "
                               f"{e.id}' = ... must come first (or use {e.id}, the state "
                               "from the previous step)", e.span)
        return Val(self.updated[e.id])

    def ex_Neg(self, e: S.Neg):
        v = self.eval_any(e.operand)
        if isinstance(v, Sym):
            return Sym(-v.expr)
        return Val(self.unary("neg", self.to_value(v, e.operand), e.span))

    def ex_BinOp(self, e: S.BinOp):
        a, b = self.eval_any(e.left), self.eval_any(e.right)
        if isinstance(a, Sym) and isinstance(b, Sym) and e.op in ("+", "-", "*", "//"):
            x, y = a.expr, b.expr
            if e.op == "//":
                if y == 0:
                    raise CompileError("integer division by zero", e.span)
                return Sym(sympy.floor(x / y))
            return Sym({"+": x + y, "-": x - y, "*": x * y}[e.op])
        if e.op == "//":
            raise CompileError("'//' is integer division of dims and integers only; use '/' "
                               "for values", e.span)
        ia, ib = self.to_value(a, e.left), self.to_value(b, e.right)
        if e.op == "@":
            return Val(self.matmul(ia, ib, e.span))
        if e.op in _COMPARE:
            return Val(self.binary(_COMPARE[e.op], ia, ib, e.span))
        return Val(self.binary(_ARITH[e.op], ia, ib, e.span))

    def ex_Attribute(self, e: S.Attribute):
        if e.attr != "T":
            raise CompileError(f"unknown attribute '.{e.attr}' (only .T, the transpose, exists)",
                               e.span)
        vid = self.value(e.value)
        shape = self.shape(vid)
        if len(shape) < 2:
            return Val(vid)  # NumPy: .T of a vector or scalar is itself
        return Val(self.emit("transpose", (vid,), tuple(reversed(shape)), e.span))

    def _predecessor_state(self, e: S.Name) -> int:
        """State `e` over a graph: the one on the edge (or at the predecessor) that the innermost
        predecessor form binds it to."""
        topo = self.cell.topology
        if not self.scopes:
            raise CompileError(f"over {topo} a node can have several predecessors, so state "
                               f"'{e.id}' alone is ambiguous: read it inside sum_pred(...), "
                               f"mean_pred(...), max_pred(...) or pred(..., k)", e.span)
        scope = self.scopes[-1][0]
        decl = self.decls[e.id]
        return self.emit("state", (), decl.shape, e.span, (("name", e.id), ("scope", scope)))

    def _slot_index(self, ix):
        """in_slot / out_slot in an index: ("k", k) for pred(E, k)'s in_slot, ("take", slot node)
        for a run-time slot, or None for another index."""
        if not isinstance(ix, S.Name) or ix.id not in SLOT_NAMES or ix.id in self.env:
            return None
        side = SLOT_NAMES[ix.id]
        if self.cell.topology == "seq":
            raise CompileError(f"'{ix.id}' is an edge slot over grid2d or dag; over seq each "
                               "step has one edge", ix.span)
        if side == "in":
            if not self.scopes:
                raise CompileError("in_slot is the slot of an incoming edge: use it inside "
                                   "sum_pred(...), mean_pred(...), max_pred(...) or pred(..., k)",
                                   ix.span)
            scope, agg, k = self.scopes[-1]
            if agg == "index":
                return ("k", k)  # pred(E, k) reads the k-th incoming edge
            return ("take", self.emit("slot", (), (), ix.span, (("scope", scope), ("side", "in"))))
        return ("take", self.emit("slot", (), (), ix.span, (("scope", 0), ("side", "out"))))

    def ex_Subscript(self, e: S.Subscript):
        slots = [self._slot_index(ix) for ix in e.indices]
        if any(s is not None for s in slots):
            return self._slot_subscript(e, slots)
        vid = self.materialize(self.value(e.value), e.span)  # 2.0[None] is no Python
        shape = list(self.shape(vid))
        consumed = sum(1 for ix in e.indices if not _is_none(ix))
        if consumed > len(shape):
            raise CompileError(f"too many indices: {consumed} for a value of shape "
                               f"{fmt_shape(shape)}", e.span)
        spec, out, axis = [], [], 0
        for ix in e.indices:
            if _is_none(ix):
                spec.append(("new",))
                out.append(sympy.Integer(1))
                continue
            size = shape[axis]
            if isinstance(ix, S.Slice):
                lo = self._bound(ix.start, size, 0, "slice start")
                hi = self._bound(ix.stop, size, size, "slice stop")
                length = sympy.expand(hi - lo)
                if length.is_number and length <= 0:
                    raise CompileError(f"empty slice {lo}:{hi} of an axis of size {size}", ix.span)
                if not length.is_number and not (length.is_integer and length.is_positive):
                    self.constraints.append(ir.Constraint(length, "slice length", ix.span))
                # torch clamps slice bounds silently; the shapes computed here would then be wrong
                bad = f"slice {lo}:{hi} is out of range for an axis of size {size}"
                self._in_range(lo + 1, bad, ix.span)
                self._in_range(size - hi + 1, bad, ix.span)
                spec.append(("slice", lo, hi))
                out.append(length)
            else:
                i = self._bound(ix, size, None, "index")
                if (size - i).is_number and (size - i) <= 0:
                    raise CompileError(f"index {i} is out of range for an axis of size {size}",
                                       _span(ix))
                bad = f"index {i} is out of range for an axis of size {size}"
                self._in_range(size - i, bad, _span(ix))
                self._in_range(i + 1, bad, _span(ix))
                spec.append(("int", i))
            axis += 1
        out.extend(shape[axis:])
        if all(s[0] == "slice" and s[1] == 0 and same_dim(s[2], sz)
               for s, sz in zip(spec, shape)) and len(spec) <= len(shape):
            return Val(vid)  # x[:] or x[:, :]
        return Val(self.emit("getitem", (vid,), out, e.span, (("index", tuple(spec)),)))

    def _slot_subscript(self, e: S.Subscript, slots):
        """x[..., in_slot, ...]: the other indices first (a slot stands as ':'), then one `take`
        per run-time slot, left to right; pred(E, k)'s in_slot is the integer k."""
        indices = tuple(ix if s is None else S.Num(s[1], True, ix.span) if s[0] == "k" else
                        S.Slice(None, None, ix.span) for ix, s in zip(e.indices, slots))
        vid = self.value(S.Subscript(e.value, indices, e.span))
        axis, taken = 0, 0
        for ix, s in zip(indices, slots):
            if _is_none(ix):
                axis += 1
            elif isinstance(ix, S.Slice):
                if s is not None:
                    shape = self.shape(vid)
                    out = shape[:axis - taken] + shape[axis - taken + 1:]
                    vid = self.emit("take", (vid, s[1]), out, _span(ix),
                                    (("axis", axis - taken),))
                    taken += 1
                axis += 1
        return Val(vid)

    def _in_range(self, expr, failure, span):
        """A symbolic bound that must be positive once dims are bound: checked at instantiation
        (numeric bounds were checked by _bound already)."""
        expr = sympy.expand(expr)
        if not expr.is_number and not (expr.is_integer and expr.is_positive):
            self.constraints.append(ir.Constraint(expr, "index bound", span, failure))

    def _bound(self, ix, size, default, what):
        if ix is None:
            return default
        v = self.eval_any(ix)
        if not isinstance(v, Sym):
            raise CompileError(f"{what} must be an integer (a literal, dim or loop variable); "
                               "indexing by a run-time value is not supported", _span(ix))
        i = sympy.expand(v.expr)
        if i.is_number and i < 0:
            i = sympy.expand(size + i)
            if i.is_number and i < 0:
                raise CompileError(f"{what} {v.expr} is out of range for an axis of size {size}",
                                   _span(ix))
        if (i - size).is_number and i - size > 0:
            raise CompileError(f"{what} {i} is out of range for an axis of size {size}", _span(ix))
        return i

    def ex_Call(self, e: S.Call):
        if e.func in self.fns:
            return self.inline(e)
        if e.func not in BUILTINS:
            raise CompileError(f"unknown function '{e.func}'", e.span)
        return getattr(self, "call_" + e.func, self.call_elementwise)(e)

    def inline(self, e: S.Call):
        fn = self.fns[e.func]
        chain = [name for name, _ in self.inline_stack]
        self.inlined += 1
        if self.inlined > MAX_INLINED:
            raise CompileError(f"more than {MAX_INLINED} fn calls to inline in cell "
                               f"'{self.cell.name}' (each call of an fn copies its body; fns "
                               "calling others twice double the count at each level)", e.span)
        if len(chain) >= MAX_INLINE_DEPTH:
            raise CompileError(f"fn calls nest more than {MAX_INLINE_DEPTH} deep ({chain[0]} -> "
                               f"{chain[1]} -> ... -> {chain[-1]} -> {e.func})", e.span)
        if e.func in chain:
            cycle = " -> ".join(chain[chain.index(e.func):] + [e.func])
            raise CompileError(f"fn '{e.func}' calls itself ({cycle}); recursion is not allowed",
                               e.span, notes=((f"'{fn.name}' is defined here", fn.span),))
        given = self._fn_arguments(e, fn)
        bound = {p: self.eval_any(a) for p, a in given.items()}
        saved, saved_caller = self.env, self.caller_env
        # an fn sees its parameters, the cell's dims and the other fns; not the caller's locals
        self.env = {k: v for k, v in saved.items() if k in self.dims} | bound
        self.caller_env = set(saved_caller) | set(saved)
        self.inline_stack.append((e.func, e.span))
        try:
            defaults = dict(zip(fn.params, fn.defaults or (None,) * len(fn.params)))
            for p in fn.params:  # defaults in the fn's scope, left to right
                if p not in bound:
                    self.env[p] = self.eval_any(defaults[p])
            if fn.stmts is not None:
                return self._run_block(fn)
            return self.eval_any(fn.body)
        except CompileError as err:
            # Re-raised at each level of inlining, so the error ends at the outermost use (in the
            # cell body), with one note per fn body it passed through, outermost first.
            inner = getattr(err, "fn_message", err.message)
            here = ((f"in fn '{fn.name}', here", err.span),) if err.span else ()
            notes = here + err.notes
            if len(notes) > 8:  # fns nested deeply: the outermost calls and the innermost cause
                notes = notes[:3] + notes[-5:]
            wrapped = CompileError(f"{inner} (in fn '{e.func}')", e.span, notes=notes)
            wrapped.fn_message = inner
            raise wrapped from None
        finally:
            self.inline_stack.pop()
            self.env, self.caller_env = saved, saved_caller

    def stmt_Value(self, st: S.Value):
        where = "a block fn" if self.inline_stack else f"cell '{self.cell.name}'"
        raise CompileError(f"an expression alone is not a statement in {where}: bind it (a = ...) "
                           "or declare an output (output y = ...); only a block fn's last line is "
                           "a value", st.span)

    # ---- builtins -------------------------------------------------------------------------
    def _args(self, e: S.Call, lo, hi, kw=()):
        n = len(e.args)
        if not lo <= n <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise CompileError(f"{e.func}() takes {want} argument{'s' if hi != 1 else ''}, "
                               f"got {n}", e.span)
        for k, v in e.kwargs:
            if k not in kw:
                raise CompileError(f"{e.func}() has no keyword argument '{k}'", _span(v))
        return dict(e.kwargs)

    def _axis(self, e: S.Call, expr, rank, default=None, extra=0):
        if expr is None:
            return default
        a = self.int_value(expr)
        n = rank + extra
        if not -n <= a < n:
            raise CompileError(f"axis {a} is out of range for rank {rank}", _span(expr))
        return a % n if n else 0

    def call_elementwise(self, e: S.Call):
        self._args(e, 1, 1)
        return Val(self.unary(e.func, self.value(e.args[0]), e.span))

    def _binary_call(self, e):
        self._args(e, 2, 2)
        return Val(self.binary(_BINARY_FUNCS[e.func], self.value(e.args[0]),
                               self.value(e.args[1]), e.span))

    call_max = call_min = call_logaddexp = _binary_call

    def call_where(self, e):
        self._args(e, 3, 3)
        c, a, b = (self.value(x) for x in e.args)
        shape = broadcast([self.shape(c), self.shape(a), self.shape(b)], e.span)
        return Val(self.emit("where", (c, a, b), shape, e.span))

    def _reduce(self, e):
        kw = self._args(e, 1, 2, ("axis",))
        x = self.value(e.args[0])
        rank = len(self.shape(x))
        _axis_once(e, kw, 2)
        axis_expr = e.args[1] if len(e.args) == 2 else kw.get("axis")
        axis = self._axis(e, axis_expr, rank)
        return Val(self.reduce(e.func, x, axis, e.span))

    call_sum = call_mean = call_amax = call_logsumexp = _reduce

    def call_softmax(self, e):  # softmax(x, axis) as torch.softmax: the axis by place or name
        kw = self._args(e, 1, 2, ("axis",))
        x = self.value(e.args[0])
        rank = len(self.shape(x))
        if rank == 0:
            raise CompileError("softmax of a scalar", e.span)
        _axis_once(e, kw, 2)
        axis_expr = e.args[1] if len(e.args) == 2 else kw.get("axis")
        axis = self._axis(e, axis_expr, rank, default=rank - 1)
        return Val(self.emit("softmax", (x,), self.shape(x), e.span, (("axis", axis),)))

    def call_dot(self, e):
        self._args(e, 2, 2)
        a, b = self.value(e.args[0]), self.value(e.args[1])
        if len(self.shape(a)) == 0 or len(self.shape(b)) == 0:
            return Val(self.binary("mul", a, b, e.span))
        return Val(self.matmul(a, b, e.span))

    def call_outer(self, e):
        self._args(e, 2, 2)
        a, b = self.value(e.args[0]), self.value(e.args[1])
        for v in (a, b):
            if len(self.shape(v)) != 1:
                raise CompileError(f"outer() takes vectors; got shape {fmt_shape(self.shape(v))}",
                                   e.span)
        return Val(self.emit("outer", (a, b), self.shape(a) + self.shape(b), e.span))

    def call_l2norm(self, e):
        self._args(e, 1, 1)
        x = self.value(e.args[0])
        sq = self.reduce("sum", self.binary("mul", x, x, e.span), None, e.span)
        denom = self.unary("sqrt", self.binary("add", sq, self.const(sympy.Float(1e-6), e.span),
                                                e.span), e.span)
        return Val(self.binary("div", x, denom, e.span))

    def call_eye(self, e):
        self._args(e, 1, 1)
        n = self.shape_dim(e.args[0], "eye() size")
        return Val(self.emit("eye", (), (n, n), e.span, (("n", n),)))

    def _filled(self, e):
        self._args(e, 0, 3)
        shape = tuple(self.shape_dim(a, f"{e.func}() size") for a in e.args)
        return Val(self.emit(e.func, (), shape, e.span))

    call_zeros = call_ones = _filled

    def _join(self, e):
        kw = self._args(e, 1, 64, ("axis",))
        parts = [self.materialize(self.value(a), _span(a)) for a in e.args]
        shapes = [self.shape(p) for p in parts]
        rank = len(shapes[0])
        stack = e.func == "stack"
        if any(len(s) != rank for s in shapes):
            raise CompileError(f"{e.func}() of values of different ranks: "
                               + ", ".join(fmt_shape(s) for s in shapes), e.span)
        if not stack and rank == 0:
            raise CompileError("concat() of scalars; use stack()", e.span)
        axis = self._axis(e, kw.get("axis"), rank, default=0, extra=1 if stack else 0)
        for s in shapes[1:]:
            for i, (x, y) in enumerate(zip(s, shapes[0])):
                if (stack or i != axis) and not same_dim(x, y):
                    raise CompileError(f"shape mismatch in {e.func}(): "
                                       + " and ".join(fmt_shape(t) for t in (shapes[0], s)), e.span)
        if stack:
            out = shapes[0][:axis] + (sympy.Integer(len(parts)),) + shapes[0][axis:]
        else:
            total = sympy.expand(sum(s[axis] for s in shapes))
            # the parts of a split back together: 2 * (d // 2) is d where d/2 is exact
            total = sympy.expand(total.subs({sympy.floor(x): x for x in self.exact}))
            out = shapes[0][:axis] + (total,) + shapes[0][axis + 1:]
        return Val(self.emit(e.func, parts, out, e.span, (("axis", axis),)))

    call_concat = call_stack = _join

    def call_split(self, e):
        kw = self._args(e, 2, 3, ("axis",))
        x = self.value(e.args[0])
        n = self.int_value(e.args[1])
        shape = self.shape(x)
        if not shape:
            raise CompileError(f"{e.func}() of a scalar", e.span)
        if n <= 0 or n > MAX_UNROLL:
            raise CompileError(f"{e.func}() into {n} parts (1 to {MAX_UNROLL} are possible)",
                               _span(e.args[1]))
        _axis_once(e, kw, 3)
        axis_expr = e.args[2] if len(e.args) == 3 else kw.get("axis")
        axis = self._axis(e, axis_expr, len(shape), default=0)
        size = shape[axis]
        piece = sympy.expand(size / n)
        if piece.is_number and not piece.is_integer or not piece.is_number and piece.is_integer is False:
            raise CompileError(f"cannot {e.func} an axis of size {size} into {n} equal parts",
                               e.span)
        if not piece.is_number and not (piece.is_integer and piece.is_positive):
            self.constraints.append(ir.Constraint(piece, f"{e.func}() part size", e.span))
        if not piece.is_integer:
            # d/2, an integer once the constraint holds, as the integer expression d // 2: what a
            # declaration of the part's size says (`state h[d // 2]`)
            self.exact.add(piece)
            piece = sympy.floor(piece)
        ids = []
        for k in range(n):
            spec = tuple(("slice", sympy.Integer(0), s) if i != axis else
                         ("slice", sympy.expand(k * piece), sympy.expand((k + 1) * piece))
                         for i, s in enumerate(shape[:axis + 1]))
            out = shape[:axis] + (piece,) + shape[axis + 1:]
            ids.append(self.emit("getitem", (x,), out, e.span, (("index", spec),)))
        return Multi(tuple(ids))

    call_chunk = call_split

    def call_pred(self, e):
        """sum_pred(E) / mean_pred(E) / max_pred(E): E once per incoming edge, its states bound
        to that edge's, reduced; pred(E, k): E through the k-th incoming edge (section 8)."""
        agg = _PRED_FUNCS[e.func]
        self._args(e, 2, 2) if agg == "index" else self._args(e, 1, 1)
        k = self.int_value(e.args[1]) if agg == "index" else 0
        if k < 0:
            raise CompileError(f"pred(E, k) needs k >= 0, got {k}", _span(e.args[1]))
        if self.cell.topology == "seq":  # one predecessor: the previous step
            return Val(self.value(e.args[0]))
        # every pred(., k) binds the same states, so they share one scope (and values are shared)
        self.n_scopes += 1
        scope = -1 - k if agg == "index" else self.n_scopes
        self.scopes.append((scope, agg, k))
        try:
            body = self.materialize(self.value(e.args[0]), e.span)
        finally:
            self.scopes.pop()
        attrs = (("agg", agg), ("k", k), ("scope", scope))
        return Val(self.emit("pred", (body,), self.shape(body), e.span, attrs))

    call_sum_pred = call_mean_pred = call_max_pred = call_pred

def _axis_once(e: S.Call, kw: dict, positional: int):
    """The axis of sum(x, 0) / split(x, 2, 0) comes by position or by keyword, not both."""
    if len(e.args) == positional and "axis" in kw:
        raise CompileError(f"{e.func}() gets its axis twice (by position and as axis=)",
                           _span(kw["axis"]))


def _names_in(e):
    """The Name nodes of an expression, left to right (for unknown-dim errors in shapes)."""
    if isinstance(e, S.Name):
        return [e]
    if isinstance(e, tuple):
        return [n for x in e for n in _names_in(x)]
    if isinstance(e, (S.BinOp, S.Neg, S.Call, S.Subscript, S.Attribute, S.Slice)):
        out = []
        for f in dataclasses.fields(e):
            if f.name != "span":
                out += _names_in(getattr(e, f.name))
        return out
    return []


def _full_span(e) -> Span:
    """The span of a whole expression (a BinOp's own span is just its operator)."""
    if isinstance(e, S.BinOp):
        left, right = _full_span(e.left), _full_span(e.right)
    elif isinstance(e, S.Neg):
        left, right = e.span, _full_span(e.operand)
    else:
        return e.span
    if left.line != right.end_line:
        return e.span
    return Span(left.filename, left.line, left.col, right.end_line, right.end_col, left.source_line)


_FLOAT32_MAX = 3.4028234663852886e38


def _fits_float32(what, values, span):
    """Modules are built in float32 (torch's default dtype), so initial values must fit it."""
    for v in values:
        if v.is_number and abs(float(v)) > _FLOAT32_MAX:
            raise CompileError(f"{what}: {fmt_number(v)} does not fit a float32 parameter "
                               f"(at most {_FLOAT32_MAX:.4g} in magnitude)", span)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


def _is_none(ix) -> bool:
    return isinstance(ix, S.Name) and ix.id == "None"


def _span(e) -> Span:
    return e.span


def _call_name(e) -> str:
    return f"{e.func}()" if isinstance(e, S.Call) else "this expression"


def elaborate(cell: S.Cell, fns: dict, dims: Optional[dict] = None) -> ir.CellIR:
    """Build the IR of `cell`. `dims` gives values for dims needed in integer contexts; a needed
    dim not in `dims` takes its default, else NeedStatic is raised for the caller to decide."""
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, _RECURSION_LIMIT))
    try:
        return _elaborate(cell, fns, dict(dims or {}))
    finally:
        sys.setrecursionlimit(old_limit)


def _elaborate(cell: S.Cell, fns: dict, dims: dict) -> ir.CellIR:
    static: dict = {}
    while True:
        try:
            out = Elaborator(cell, fns, static).run()
            ir.verify(out)
            _remember_general(cell, fns, {**dims, **static}, out)
            return out
        except NeedStatic as need:
            missing = []
            for name in need.names:
                if name in static:
                    continue
                decl = next(d for d in cell.dims if d.name == name)
                value = dims.get(name, decl.default)
                if value is None:
                    missing.append(name)
                else:
                    static[name] = value
            if missing:
                raise


def _remember_general(cell: S.Cell, fns: dict, dims: dict, out: ir.CellIR) -> None:
    """Elaborate the cell's general form (its literal sizes as hidden dims) for the analysis
    (rcc.passes.generalize); a form that does not elaborate is simply not kept."""
    sizes = literal_sizes(cell)
    if not sizes:
        return
    for everywhere in (True, False):  # every literal equal to a size, else the shapes' only
        general_cell, general_fns = generalize(cell, fns, sizes, everywhere)
        try:
            general = elaborate(general_cell, general_fns, dims)
        except (CompileError, NeedStatic):
            continue
        if remember(out, general):
            return
