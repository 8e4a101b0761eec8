"""Source text with a name, and span construction from line/column positions."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass(frozen=True)
class Source:
    filename: str
    text: str
    lines: tuple = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "lines", tuple(self.text.split("\n")))

    def line_text(self, line: int) -> str:
        return self.lines[line - 1] if 1 <= line <= len(self.lines) else ""

    def span(self, line: int, col: int, end_line: int = 0, end_col: int = 0) -> Span:
        return Span(self.filename, line, col, end_line or line, end_col or col + 1,
                    self.line_text(line))
