"""The surface AST: frozen dataclasses, each with the Span of its source text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .errors import Span

# ---- expressions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    value: float
    is_int: bool
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Primed:
    """`s'`: the next value of state `s`."""
    id: str
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / @ ** < <= > >= == !=
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple
    kwargs: tuple  # ((name, Expr), ...)
    span: Span


@dataclass(frozen=True)
class Slice:
    start: Optional["Expr"]
    stop: Optional["Expr"]
    span: Span


@dataclass(frozen=True)
class Subscript:
    value: "Expr"
    indices: tuple  # of Expr | Slice
    span: Span


@dataclass(frozen=True)
class Attribute:
    value: "Expr"
    attr: str
    span: Span


Expr = Union[Num, Name, Primed, Neg, BinOp, Call, Subscript, Attribute]

# ---- statements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeclItem:
    kind: str  # input | param | state
    name: str
    shape: tuple  # of Expr; () for scalars
    init: Optional[Expr]
    span: Span
    over: Optional[tuple] = None  # ("edges" | "nodes", span) from `state C[...] over edges`


@dataclass(frozen=True)
class Decl:
    kind: str
    items: tuple
    span: Span


@dataclass(frozen=True)
class Assign:
    target: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Destructure:
    targets: tuple  # of Name
    value: Expr
    span: Span


@dataclass(frozen=True)
class Update:
    state: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Output:
    name: str
    value: Optional[Expr]  # None for `output s'`
    span: Span


@dataclass(frozen=True)
class For:
    var: str
    start: Expr
    stop: Expr
    body: tuple
    span: Span


@dataclass(frozen=True)
class Value:
    """An expression alone on a line: the value of a block fn, as its last line."""
    value: Expr
    span: Span


Stmt = Union[Decl, Assign, Destructure, Update, Output, For, Value]

# ---- top level -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DimDecl:
    name: str
    default: Optional[int]
    span: Span


@dataclass(frozen=True)
class Cell:
    name: str
    dims: tuple  # of DimDecl
    topology: str
    body: tuple  # of Stmt
    span: Span
    topology_span: Optional[Span] = None


@dataclass(frozen=True)
class FnDef:
    name: str
    params: tuple  # of str
    body: Expr  # the value: the expression, or a block fn's last line
    span: Span
    # a block fn's statements before its last line (None: an expression fn). Each use of a block
    # fn runs them with fresh copies of the states and params they declare.
    stmts: Optional[tuple] = None
    defaults: tuple = ()  # per param: its default Expr, or None (required)


@dataclass(frozen=True)
class Use:
    target: str
    is_path: bool
    span: Span


@dataclass(frozen=True)
class Module:
    filename: str
    items: tuple  # of Cell | FnDef | Use
