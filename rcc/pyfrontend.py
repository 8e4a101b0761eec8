"""@rcc.recurrence: trace an annotated Python function into the same IR as a .rnn cell.

    @rcc.recurrence(dims={"d": 32})
    def MinGRU(x: rcc.Input["d_in"], h: rcc.State["d"], Wz: rcc.Param["d", "d_in"]):
        z = rcc.sigmoid(Wz @ x)
        return {"h'": (1 - z) * h + z * x, "y": h}

Arguments are declarations (their annotation says input, param or state, the shape as dim
expressions, and optionally an initializer); the function runs once on proxy values that drive
the Elaborator directly, so traced cells get the same checks, spans and backends as .rnn cells.
The returned dict maps `"s'"` to the next value of state s and other keys to outputs, in order.
An argument annotated `rcc.Dim` is a dim's value (`def f(q: rcc.Input["K"], K: rcc.Dim)`), for
arithmetic (`q * K ** -0.5`) and slices (`x[:K // 2]`), as a dim's name is in a .rnn cell.
"""
from __future__ import annotations

import dataclasses
import inspect
import linecache
import os
import sys

from . import _TRACED_FUNCTIONS
from . import syntax as S
from .elaborate import Elaborator, Multi, Val
from .errors import CompileError, Span

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _DeclSpec:
    def __init__(self, kind, shape=(), init=None):
        self.kind, self.shape, self.init = kind, tuple(shape), init

    def __repr__(self):
        return f"rcc.{self.kind.capitalize()}{list(self.shape)}"


class _DeclKind:
    """`rcc.Input["d"]`, `rcc.Param["d", "d_in"]`, `rcc.State("d", init="0")`, or bare `rcc.Input`
    for a scalar. Shape entries are ints or dim expressions as strings ("4*d")."""

    def __init__(self, kind):
        self.kind = kind

    def __getitem__(self, shape):
        return _DeclSpec(self.kind, shape if isinstance(shape, tuple) else (shape,))

    def __call__(self, *shape, init=None):
        return _DeclSpec(self.kind, shape, init)

    def __repr__(self):
        return f"rcc.{self.kind.capitalize()}"


Input, Param, State = _DeclKind("input"), _DeclKind("param"), _DeclKind("state")


class _DimKind:
    """`K: rcc.Dim`: the argument is dim K's value (declaring the dim if no shape names it)."""

    def __repr__(self):
        return "rcc.Dim"


Dim = _DimKind()


class TracedDim:
    """A dim expression inside a traced function (an `rcc.Dim` argument, or arithmetic on one
    with Python numbers): usable as a value and, when an integer, as an index or slice bound."""

    __slots__ = ("expr",)

    def __init__(self, expr):
        self.expr = expr  # .rnn syntax (rcc.syntax)

    def _binop(self, op, other, reflected=False):
        if isinstance(other, Traced):  # a value: the traced value's operator builds it
            return other._binop(op, self, not reflected)
        span = _user_span()
        if isinstance(other, TracedDim):
            b = other.expr
        elif isinstance(other, (int, float)) and not isinstance(other, bool):
            # (not abs(): this module's abs is rcc.abs, a traced function)
            b = S.Num(other if other >= 0 else -other, isinstance(other, int), span)
            b = b if other >= 0 else S.Neg(b, span)
        else:
            return NotImplemented
        a = self.expr
        return TracedDim(S.BinOp(op, b, a, span) if reflected else S.BinOp(op, a, b, span))

    def __floordiv__(self, other):
        return self._binop("//", other)

    def __rfloordiv__(self, other):
        return self._binop("//", other, True)

    def __neg__(self):
        return TracedDim(S.Neg(self.expr, _user_span()))

    __hash__ = None

    def __bool__(self):
        raise CompileError("a dim has no truth value at trace time (its value is bound when the "
                           "module is built)", _user_span())

    def __repr__(self):
        return "<traced dim expression>"


def _user_span() -> Span:
    """The span of the innermost frame outside rcc: where the user's traced operation is."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return Span("<traced>", 1, 1, 1, 2, "")
    filename, line = frame.f_code.co_filename, frame.f_lineno
    col, end_col = 1, 2
    try:
        positions = list(frame.f_code.co_positions())[frame.f_lasti // 2]
        if positions[0] == line and positions[2] is not None:
            col = positions[2] + 1
            end_col = (positions[3] + 1) if positions[1] == line and positions[3] else col + 1
    except (AttributeError, IndexError, TypeError):
        pass
    return Span(filename, line, col, line, end_col, linecache.getline(filename, line).rstrip("\n"))


class Traced:
    """A value inside a traced function. Operators and rcc functions build IR nodes."""

    __slots__ = ("_tracer", "_name")
    __array_priority__ = 1000  # so numpy scalars defer to our reflected operators

    def __init__(self, tracer, name):
        self._tracer, self._name = tracer, name

    def _binop(self, op, other, reflected=False):
        t = self._tracer
        a, b = t.expr(self), t.expr(other)
        if reflected:
            a, b = b, a
        return t.eval(S.BinOp(op, a, b, _user_span()))

    __hash__ = None

    def __neg__(self):
        return self._tracer.eval(S.Neg(self._tracer.expr(self), _user_span()))

    def __pos__(self):
        return self

    @property
    def T(self):  # noqa: N802 (NumPy's name)
        return self._tracer.eval(S.Attribute(self._tracer.expr(self), "T", _user_span()))

    def __getitem__(self, index):
        span = _user_span()
        t = self._tracer
        items = index if isinstance(index, tuple) else (index,)
        out = []
        for ix in items:
            if ix is None:
                out.append(S.Name("None", span))
            elif isinstance(ix, slice):
                if ix.step not in (None, 1):
                    raise CompileError("slices with a step are not supported", span)
                out.append(S.Slice(t.int_expr(ix.start, span), t.int_expr(ix.stop, span), span))
            else:
                out.append(t.int_expr(ix, span))
        return t.eval(S.Subscript(t.expr(self), tuple(out), span))

    def __bool__(self):
        raise CompileError("a traced value has no truth value at trace time; use rcc.where(c, a, b)",
                           _user_span())

    def __iter__(self):
        raise CompileError("a traced value cannot be iterated; index it or use rcc.split",
                           _user_span())

    def __abs__(self):
        return self._tracer.call("abs", (self,), {})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch.tanh(h) on a traced value: the cell's functions are rcc's (rcc.tanh(h))."""
        import torch
        name = getattr(func, "__name__", str(func))
        if getattr(func, "__objclass__", None) is torch._C.TensorBase:
            # a torch tensor's operator (torch.tensor(0.5) * h): Python then asks the traced
            # value's reflected operator, which takes a 0-d tensor's value
            return NotImplemented
        hint = f"rcc.{name}" if name in _FUNCTION_NAMES else "an rcc function (docs/language.md)"
        raise CompileError(f"torch.{name} cannot trace a cell's value; write {hint}", _user_span())

    def __getattr__(self, name):  # x.sum() and other tensor methods: say the rcc spelling
        if name.startswith("__"):
            raise AttributeError(name)
        hint = f"rcc.{name}(...)" if name in _FUNCTION_NAMES else "an rcc function or operator"
        raise CompileError(f"a traced value has no method .{name}(); write {hint}", _user_span())

    def __repr__(self):
        n = self._tracer.elab.nodes[self._tracer.elab.env[self._name].id]
        return f"<traced {n.type}>"


_FUNCTION_NAMES = _TRACED_FUNCTIONS  # the language's functions as rcc.<name> (rcc/__init__.py)

# Python operator methods -> the .rnn operator they build; arithmetic ones also come reflected
_ARITHMETIC = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "matmul": "@", "pow": "**"}
_COMPARISONS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
for _method, _op in (_ARITHMETIC | _COMPARISONS).items():
    setattr(Traced, f"__{_method}__", lambda s, o, op=_op: s._binop(op, o))
for _method, _op in _ARITHMETIC.items():
    setattr(Traced, f"__r{_method}__", lambda s, o, op=_op: s._binop(op, o, True))
for _method, _op in (_ARITHMETIC | _COMPARISONS).items():
    setattr(TracedDim, f"__{_method}__", lambda s, o, op=_op: s._binop(op, o))
for _method, _op in _ARITHMETIC.items():
    setattr(TracedDim, f"__r{_method}__", lambda s, o, op=_op: s._binop(op, o, True))


class _Tracer:
    def __init__(self, elab: Elaborator):
        self.elab = elab
        self.count = 0

    def bind(self, vid) -> Traced:
        name = f"%{self.count}"  # not a legal .rnn identifier, so it never clashes with a user name
        self.count += 1
        self.elab.env[name] = Val(vid)
        return Traced(self, name)

    def expr(self, v):
        span = _user_span()
        if isinstance(v, Traced):
            if v._tracer is not self:
                raise CompileError("a traced value from another @rcc.recurrence function", span)
            return S.Name(v._name, span)
        if isinstance(v, TracedDim):
            return v.expr
        if isinstance(v, bool):
            return S.Num(int(v), True, span)
        if isinstance(v, int):
            return S.Num(v, True, span) if v >= 0 else S.Neg(S.Num(-v, True, span), span)
        if isinstance(v, float):
            return S.Num(v, False, span) if v >= 0 else S.Neg(S.Num(-v, False, span), span)
        if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy / torch scalars
            return self.expr(v.item())
        raise CompileError(f"cannot use a {type(v).__name__} in a traced cell (only traced values "
                           "and Python numbers)", span)

    def int_expr(self, v, span):
        if v is None:
            return None
        if isinstance(v, TracedDim):
            return v.expr
        if isinstance(v, Traced):
            raise CompileError("indexing by a traced value is not supported; use Python ints",
                               span)
        if not isinstance(v, int):
            raise CompileError(f"an index must be a Python int, got {type(v).__name__}", span)
        return self.expr(v)

    def eval(self, e):
        out = self.elab.eval_any(e)
        if isinstance(out, Multi):
            return tuple(self.bind(i) for i in out.ids)
        return self.bind(self.elab.to_value(out, e))

    def call(self, func, args, kwargs):
        span = _user_span()
        exprs = tuple(self.expr(a) for a in args)
        kws = tuple((k, self.expr(v)) for k, v in kwargs.items())
        return self.eval(S.Call(func, exprs, kws, span))


_ACTIVE: list = []  # the tracer of the function being traced (a stack, for safety)


def _traced_function(name):
    def fn(*args, **kwargs):
        tracer = next((a._tracer for a in args if isinstance(a, Traced)), None)
        if tracer is None:
            if not _ACTIVE:
                raise TypeError(f"rcc.{name} works on traced values inside an @rcc.recurrence "
                                "function")
            tracer = _ACTIVE[-1]
        return tracer.call(name, args, kwargs)
    fn.__name__ = name
    fn.__doc__ = f"rcc.{name}: the language's {name} (docs/language.md), inside @rcc.recurrence functions."
    return fn


for _name in sorted(_FUNCTION_NAMES):
    globals()[_name] = _traced_function(_name)


def _dim_expr(text, span):
    """Parse a shape entry written as a string ("4*d") with the .rnn expression grammar."""
    from .parser import parse

    try:
        module = parse(f"cell _c() {{\n_x = {text}\n}}", span.filename)
    except CompileError:
        raise CompileError(f"bad shape entry {text!r}", span) from None
    return _respan(module.items[0].body[0].value, span)


def _respan(node, span):
    """Point every sub-expression at `span` (the annotation), not at the synthetic text."""
    if isinstance(node, tuple):
        return tuple(_respan(n, span) for n in node)
    if not dataclasses.is_dataclass(node):
        return node
    changes = {f.name: (span if f.name == "span" else _respan(getattr(node, f.name), span))
               for f in dataclasses.fields(node)}
    return dataclasses.replace(node, **changes)


def _names_in(e, out):
    if isinstance(e, S.Name):
        if e.id not in out:
            out.append(e.id)
    elif dataclasses.is_dataclass(e):
        for f in dataclasses.fields(e):
            _names_in(getattr(e, f.name), out)
    elif isinstance(e, tuple):
        for x in e:
            _names_in(x, out)


def trace(fn, dims=None):
    """Trace `fn` into a CellIR (what @rcc.recurrence compiles)."""
    from .passes import run_pipeline

    code = fn.__code__
    filename, line = code.co_filename, code.co_firstlineno
    text = linecache.getline(filename, line).rstrip("\n")
    col = len(text) - len(text.lstrip()) + 1  # the decorator or def, not its indentation
    def_span = Span(filename, line, col, line, col + len(text.strip()), text)
    sig = inspect.signature(fn)
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception as e:  # a bad annotation string is the user's error, reported at the def
        raise CompileError(f"cannot evaluate the annotations of {fn.__name__}: {e}", def_span) from None
    items, dim_names = [], []
    for pname, p in sig.parameters.items():
        spec = hints.get(pname)
        if isinstance(spec, _DeclKind):
            spec = _DeclSpec(spec.kind)
        if not isinstance(spec, (_DeclSpec, _DimKind)):
            raise CompileError(f"argument '{pname}' needs an annotation rcc.Input[...], "
                               "rcc.Param[...], rcc.State[...] or rcc.Dim", def_span)
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            raise CompileError(f"argument '{pname}' must be a plain positional argument", def_span)
        if isinstance(spec, _DimKind):
            items.append(pname)
            if pname not in dim_names:
                dim_names.append(pname)
            continue
        shape = tuple(_dim_expr(str(s), def_span) for s in spec.shape)
        _names_in(shape, dim_names)
        init = _dim_expr(spec.init, def_span) if spec.init is not None else None
        items.append(S.DeclItem(spec.kind, pname, shape, init, def_span))
    defaults = dict(dims or {})
    for k in defaults:
        if k not in dim_names:
            dim_names.append(k)
    cell = S.Cell(fn.__name__, tuple(S.DimDecl(d, defaults.get(d), def_span) for d in dim_names),
                  "seq", (), def_span)
    elab = Elaborator(cell, {}, {})
    tracer = _Tracer(elab)
    args = []
    for item in items:
        if isinstance(item, str):  # a dim
            args.append(TracedDim(S.Name(item, def_span)))
            continue
        elab.declare(item)
        args.append(tracer.bind(elab.env[item.name].id))
    result, local_names = _call_capturing_locals(fn, args, tracer)
    if not isinstance(result, dict):
        raise CompileError(f"{fn.__name__} must return a dict: {{\"h'\": next_h, \"y\": output}}",
                           def_span)
    for key, value in result.items():
        if not isinstance(key, str):
            raise CompileError(f"{fn.__name__} returned a dict key {key!r}; keys are \"s'\" for "
                               "states and output names", def_span)
        vexpr = tracer.expr(value) if not isinstance(value, Traced) else S.Name(value._name, def_span)
        if key.endswith("'"):
            elab.stmt_Update(S.Update(key[:-1], vexpr, def_span))
        else:
            elab.stmt_Output(S.Output(key, vexpr, def_span))
    for var, value in local_names.items():  # readable generated code: name values as the user did
        if isinstance(value, Traced) and value._tracer is tracer:
            elab.name_value(elab.env[value._name].id, var)
    return run_pipeline(elab.run())


def _call_capturing_locals(fn, args, tracer):
    """Run fn on traced args; also return its local variables at return time (for value names)."""
    captured = {}
    code = fn.__code__
    previous = sys.getprofile()

    def hook(frame, event, arg):
        if event == "return" and frame.f_code is code:
            captured.update(frame.f_locals)

    _ACTIVE.append(tracer)
    sys.setprofile(hook)
    try:
        result = fn(*args)
    finally:
        sys.setprofile(previous)
        _ACTIVE.pop()
    return result, captured


def recurrence(fn=None, *, dims=None, backend="auto", plan="auto"):
    """Decorator: compile an annotated Python step function into a torch.nn.Module class."""
    def wrap(f):
        from .api import compile_ir

        cls = compile_ir(trace(f, dims), backend=backend, plan=plan,
                         source_name=f"{f.__code__.co_filename} ({f.__name__})")
        cls.__doc__ = f.__doc__ or cls.__doc__
        return cls

    return wrap(fn) if fn is not None else wrap
