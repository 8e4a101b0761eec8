"""Source spans and CompileError, the one error type a bad cell produces.

Kept free of heavy imports: generated modules raise CompileError for bad dims at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A region of a source file: 1-based line and column of its first character."""

    filename: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0
    source_line: str = field(default="", repr=False, compare=False)  # text of `line`, for the caret

    def width(self) -> int:
        if self.end_line == self.line and self.end_col > self.col:
            return self.end_col - self.col
        return 1


class CompileError(Exception):
    """A cell that cannot be compiled: `FILE:LINE:COL: error: MESSAGE` plus a caret excerpt."""

    def __init__(self, message: str, span: Span | None = None, notes: tuple = ()):
        self.message = message
        self.span = span
        self.filename = span.filename if span else "<unknown>"
        self.line = span.line if span else 0
        self.col = span.col if span else 0
        # notes: (message, span) pairs shown after the main error, e.g. where an fn is defined
        self.notes = tuple(notes)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [_format_one("error", self.message, self.span)]
        for text, span in self.notes:
            lines.append(_format_one("note", text, span))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _format_one(kind: str, message: str, span: Span | None) -> str:
    if span is None:
        return f"<unknown>:0:0: {kind}: {message}"
    head = f"{span.filename}:{span.line}:{span.col}: {kind}: {message}"
    if not span.source_line:
        return head
    # tabs count as one column, as in the lexer's positions
    text = span.source_line.rstrip("\n").expandtabs(1)
    start = 0
    if len(text) > _EXCERPT:  # a very long line: show a window around the column
        start = max(0, min(span.col - 1 - _EXCERPT // 2, len(text) - _EXCERPT))
        head_mark = "..." if start > 0 else ""
        tail_mark = "..." if start + _EXCERPT < len(text) else ""
        text = head_mark + text[start:start + _EXCERPT] + tail_mark
        start -= len(head_mark)
    col = span.col - start
    caret = " " * (col - 1) + "^" * max(1, min(span.width(), len(text) - col + 1))
    return f"{head}\n    {text}\n    {caret}"


_EXCERPT = 100  # longest source excerpt shown under an error


# backend triton without the triton package (an optional dependency: it has Linux wheels only)
NO_TRITON = ("backend 'triton' needs the triton package, which rcc installs only on request: "
             "pip install 'rcc[triton]' (Linux; or pip install triton). Backends 'torch' and "
             "'cpp' run without it.")


def require_triton():
    """Import triton, or raise an ImportError saying how to install it."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(NO_TRITON) from e
