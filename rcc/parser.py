"""Text -> AST: the lark grammar in grammar/rnn.lark, a separator post-lexer, a transformer."""
from __future__ import annotations

import functools
import math
from importlib import resources

from lark import Lark, Token, Tree, v_args
from lark.exceptions import (LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken,
                             VisitError)
from lark.visitors import Transformer_NonRecursive

from . import syntax as S
from .errors import CompileError
from .source import Source


class SeparatorPostLexer:
    """Normalises statement separators so the grammar can say `(stmt _SEP)*`.

    Why here and not in the grammar: newlines end statements except inside brackets, and
    blank lines / `;;` are harmless; expressing that in LALR rules causes conflicts.
    """

    always_accept = ("_SEP",)

    def process(self, stream):
        depth = 0
        pending = None  # a _SEP waiting to see what follows it
        last = None
        for tok in stream:
            if tok.type == "_SEP":
                if depth == 0 and last is not None and last.type not in ("_SEP", "LBRACE"):
                    pending = pending or tok
                continue
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            if tok.type == "RBRACE" and last is not None and last.type != "LBRACE" \
                    and (pending is not None or last.type != "_SEP"):
                # a '}' closes the last statement, with or without a separator before it
                yield pending or Token.new_borrow_pos("_SEP", ";", tok)
                pending = None
                last = None
            elif pending is not None:
                if tok.type != "LBRACE":
                    yield pending
                pending = None
            yield tok
            last = tok
        if last is not None and last.type != "_SEP":
            yield pending or Token("_SEP", "\n", line=last.end_line or last.line,
                                   column=(last.end_column or last.column))


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = resources.files("rcc.grammar").joinpath("rnn.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="basic", propagate_positions=True,
                postlex=SeparatorPostLexer(), maybe_placeholders=True)


def parse(text: str, filename: str = "<string>") -> S.Module:
    """Parse a whole .rnn file; raise CompileError with a caret on any syntax error."""
    source = Source(filename, text)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    except LarkError as e:  # defensive: any other lark failure is still a CompileError
        raise CompileError(f"syntax error: {e}", source.span(1, 1)) from None
    _check_depth(tree, source)
    try:
        return _ToAst(source).transform(tree)
    except VisitError as e:  # lark wraps what the callbacks raise; ours are CompileErrors
        if isinstance(e.orig_exc, CompileError):
            raise e.orig_exc from None
        raise


# Deeper expressions than this are refused: the elaborator and the printers walk expressions
# recursively, and no hand-written cell comes near it.
MAX_DEPTH = 200


_STATEMENTS = {"fndef", "fnblock", "value", "decl", "assign", "destructure", "update",
               "output_expr", "forloop"}


def _fn_params(params):
    """(names, defaults) of an fn's parameters; a parameter without a default may not follow
    one with a default."""
    params = [p for p in params if p is not None]
    seen_default = False
    for name, default, span in params:
        if default is None and seen_default:
            raise CompileError(f"parameter '{name}' has no default but follows one that has "
                               "(parameters with defaults come last)", span)
        seen_default = seen_default or default is not None
    return tuple(n for n, _, _ in params), tuple(d for _, d, _ in params)


def _check_depth(tree, source: Source):
    stack = [(tree, 1, tree)]  # (node, depth, the statement it belongs to, for the caret)
    while stack:
        node, depth, stmt = stack.pop()
        if node.data in _STATEMENTS:
            stmt = node
        if depth > MAX_DEPTH:
            line, col = getattr(stmt.meta, "line", 1), getattr(stmt.meta, "column", 1)
            raise CompileError(f"expression is nested too deeply (more than {MAX_DEPTH} levels)",
                               source.span(line, col))
        stack.extend((c, depth + 1, stmt) for c in node.children if isinstance(c, Tree))


_TOKEN_WORDS = {
    "_SEP": "end of statement", "NAME": "a name", "NUMBER": "a number", "STRING": "a \"path\"",
    "PRIMED": "a primed state name", "CMPOP": "a comparison", "$END": "end of file",
}


def _token_word(name: str) -> str:
    """How an expected terminal reads in a message: its literal text, or a description."""
    if name in _TOKEN_WORDS:
        return _TOKEN_WORDS[name]
    try:
        term = _lark().get_terminal(name)
    except KeyError:
        return name.lower()
    return repr(term.pattern.value) if term.pattern.type == "str" else name.lower()


def _syntax_error(e: UnexpectedInput, source: Source) -> CompileError:
    line = getattr(e, "line", 1) or 1
    col = getattr(e, "column", 1) or 1
    if line < 1:
        line, col = max(1, len(source.lines)), max(1, len(source.lines[-1]) + 1)
    if isinstance(e, UnexpectedCharacters):
        ch = source.line_text(line)[col - 1: col] or "?"
        hint = " (a prime ' follows a state name directly: h')" if ch == "'" else ""
        return CompileError(f"unexpected character {ch!r}{hint}", source.span(line, col))
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            unclosed = _unclosed_brace(source)
            if unclosed is not None:
                return CompileError("unexpected end of file: a '{' is never closed with '}'",
                                    source.span(line, col),
                                    notes=(("the '{' opened here", unclosed),))
            what = "end of file"
        elif tok.type == "_SEP":
            what = "end of line" if "\n" in str(tok) else "';'"
        else:
            what = repr(str(tok))
        bracket = _unclosed_bracket(source, line, col)
        if bracket is not None:  # the cause is the bracket, not the token after the line
            sym, span = bracket
            after = "" if tok.type in ("_SEP", "$END") else \
                f" (then unexpected {what} at line {line}, column {col})"
            return CompileError(f"'{sym}' was never closed{after}", span)
        expected = sorted({_token_word(t) for t in (e.expected or ())
                           if not t.startswith("__IGNORE")})
        hint = f"; expected {', '.join(expected[:8])}" if expected else ""
        if len(expected) > 8:
            hint += ", ..."
        width = len(str(tok)) if tok.type not in ("_SEP", "$END") else 1
        return CompileError(f"unexpected {what}{hint}",
                            source.span(line, col, line, col + width))
    return CompileError("syntax error", source.span(line, col))


def _unclosed_brace(source: Source):
    """The span of the innermost '{' left open at the end of the text, if any."""
    opened = []
    try:
        for tok in _lark().lex(source.text, dont_ignore=False):
            if tok.type == "LBRACE":
                opened.append(tok)
            elif tok.type == "RBRACE" and opened:
                opened.pop()
    except LarkError:
        return None
    if not opened:
        return None
    tok = opened[-1]
    return source.span(tok.line, tok.column, tok.line, tok.column + 1)


def _unclosed_bracket(source: Source, line: int, col: int):
    """('(' or '[', its span) for the innermost bracket still open where a syntax error was found
    at (line, col), when it was opened on an earlier line; else None."""
    opened = []
    try:
        for tok in _lark().lex(source.text, dont_ignore=False):
            if (tok.line, tok.column) >= (line, col):
                break
            if tok.type in ("LPAR", "LSQB"):
                opened.append(tok)
            elif tok.type in ("RPAR", "RSQB") and opened:
                opened.pop()
    except LarkError:
        return None
    if not opened or opened[-1].line >= line:
        return None
    tok = opened[-1]
    return str(tok), source.span(tok.line, tok.column, tok.line, tok.column + 1)


class _ToAst(Transformer_NonRecursive):
    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta_or_tok):
        m = meta_or_tok
        if isinstance(m, Token):
            return self.source.span(m.line, m.column, m.end_line or m.line,
                                    m.end_column or m.column + len(m))
        if getattr(m, "empty", False) or not hasattr(m, "line"):
            return self.source.span(1, 1)
        return self.source.span(m.line, m.column, m.end_line, m.end_column)

    # ---- top level
    def start(self, items):
        return S.Module(self.source.filename, tuple(items))

    @v_args(meta=True)
    def use(self, meta, children):
        (tok,) = children
        if tok.type == "STRING":
            return S.Use(str(tok)[1:-1], True, self._span(meta))
        return S.Use(str(tok), False, self._span(meta))

    @v_args(meta=True)
    def fndef(self, meta, children):
        name, *params, body = children
        names, defaults = _fn_params(params)
        return S.FnDef(str(name), names, body, self._span(name), defaults=defaults)

    def fnparam(self, children):
        name, default = children
        return (str(name), default, self._span(name))

    @v_args(meta=True)
    def fnblock(self, meta, children):
        name, *params, body = children
        params, defaults = _fn_params(params)
        if not body or not isinstance(body[-1], S.Value):
            where = body[-1].span if body else self._span(name)
            raise CompileError(f"fn '{name}' must end with its value: an expression alone on its "
                               "last line", where)
        return S.FnDef(str(name), params, body[-1].value, self._span(name), tuple(body[:-1]),
                       defaults)

    @v_args(meta=True)
    def value(self, meta, children):
        (expr,) = children
        return S.Value(expr, self._span(meta))

    @v_args(meta=True)
    def cell(self, meta, children):
        name, *dims, topo, body = children
        dims = tuple(d for d in dims if d is not None)
        topo_span = self._span(topo) if topo is not None else None
        return S.Cell(str(name), dims, str(topo) if topo is not None else "seq", body,
                      self._span(name), topo_span)

    def dimdecl(self, children):
        name, default = children
        span = self._span(name)
        if default is None:
            return S.DimDecl(str(name), None, span)
        text = str(default)
        if not text.isdigit():
            raise CompileError(f"default of dim '{name}' must be an integer, not {text}",
                               self._span(default))
        if len(text.lstrip("0")) > 18:  # past int64, so no tensor axis can have this size
            raise CompileError(f"default of dim '{name}' is too large", self._span(default))
        return S.DimDecl(str(name), int(text), span)

    def body(self, stmts):
        return tuple(stmts)

    # ---- statements
    @v_args(meta=True)
    def decl(self, meta, children):
        kind, *items = children
        items = tuple(S.DeclItem(str(kind), *it) for it in items)
        return S.Decl(str(kind), items, self._span(meta))

    def declitem(self, children):
        name, shape, init, where = children
        over = (str(where), self._span(where)) if where is not None else None
        return (str(name), tuple(shape) if shape is not None else (), init, self._span(name), over)

    def shape(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def assign(self, meta, children):
        name, value = children
        return S.Assign(str(name), value, self._span(name))

    @v_args(meta=True)
    def destructure(self, meta, children):
        *names, value = children
        targets = tuple(S.Name(str(n), self._span(n)) for n in names)
        return S.Destructure(targets, value, self._span(meta))

    @v_args(meta=True)
    def update(self, meta, children):
        primed, value = children
        return S.Update(str(primed)[:-1], value, self._span(primed))

    @v_args(meta=True)
    def output_expr(self, meta, children):
        name, value = children
        return S.Output(str(name), value, self._span(name))

    @v_args(meta=True)
    def output_state(self, meta, children):
        (primed,) = children
        return S.Output(str(primed)[:-1], None, self._span(primed))

    @v_args(meta=True)
    def forloop(self, meta, children):
        var, start, stop, body = children
        return S.For(str(var), start, stop, body, self._span(var))

    # ---- expressions
    @v_args(meta=True)
    def compare(self, meta, children):
        left, op, right = children
        return S.BinOp(str(op), left, right, self._span(op))

    def _binop(op):
        @v_args(meta=True)
        def build(self, meta, children):
            left, right = children
            return S.BinOp(op, left, right, self._operator_span(meta, left, right, op))
        return build

    add, sub, mul, div, matmul = _binop("+"), _binop("-"), _binop("*"), _binop("/"), _binop("@")
    floordiv = _binop("//")

    def _operator_span(self, meta, left, right, op):
        """The span of the operator token: between the end of `left` and `right`'s start."""
        ls, rs = _expr_span(left), _expr_span(right)
        line_text = self.source.line_text(ls.end_line)
        if ls.end_line == rs.line:
            seg = line_text[ls.end_col - 1: rs.col - 1]
        else:
            seg = line_text[ls.end_col - 1:]
        i = seg.find(op)
        if i < 0:
            return self._span(meta)
        return self.source.span(ls.end_line, ls.end_col + i, ls.end_line, ls.end_col + i + len(op))

    pow = _binop("**")

    @v_args(meta=True)
    def neg(self, meta, children):
        return S.Neg(children[0], self._span(meta))

    def unary(self, children):  # unary plus
        return children[0]

    @v_args(meta=True)
    def call(self, meta, children):
        name, *args = children
        pos, kw = [], []
        for a in args:
            if a is None:
                continue
            if isinstance(a, tuple):
                if any(k == a[0] for k, _ in kw):
                    raise CompileError(f"keyword argument '{a[0]}' is given twice",
                                       _expr_span(a))
                kw.append(a)
            else:
                if kw:
                    raise CompileError("positional argument after a keyword argument",
                                       _expr_span(a))
                pos.append(a)
        return S.Call(str(name), tuple(pos), tuple(kw), self._span(name))

    def arg(self, children):
        return children[0]

    def kwarg(self, children):
        name, value = children
        return (str(name), value)

    @v_args(meta=True)
    def subscript(self, meta, children):
        value, *indices = children
        return S.Subscript(value, tuple(indices), self._span(meta))

    def index(self, children):
        return children[0]

    @v_args(meta=True)
    def slice(self, meta, children):
        start, stop = children
        return S.Slice(start, stop, self._span(meta))

    @v_args(meta=True)
    def attribute(self, meta, children):
        value, attr = children
        return S.Attribute(value, str(attr), self._span(attr))

    def number(self, children):
        (tok,) = children
        text = str(tok)
        span = self._span(tok)
        if text.isdigit():
            # beyond float64's range an integer can be neither a value nor a size
            if len(text.lstrip("0")) > 308:
                raise CompileError(f"integer literal with {len(text)} digits is too large", span)
            return S.Num(int(text), True, span)
        value = float(text)
        if math.isinf(value):
            raise CompileError(f"number {text} is too large for a 64-bit float", span)
        return S.Num(value, False, span)

    def name(self, children):
        (tok,) = children
        return S.Name(str(tok), self._span(tok))

    def primed(self, children):
        (tok,) = children
        return S.Primed(str(tok)[:-1], self._span(tok))


def _expr_span(e):
    return e[1].span if isinstance(e, tuple) else e.span
