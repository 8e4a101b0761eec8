"""Source text with a name, span construction from line/column positions, and reading a source
(no lark or sympy here: rcc.frontcache reads sources without the compiler)."""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

from .errors import CompileError, Span


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


_STDLIB_PATH = re.compile(r"stdlib/([A-Za-z_][A-Za-z0-9_]*)\.rnn")


def packaged_stdlib(path: str):
    """The name `stdlib/NAME.rnn` the packaged stdlib answers for `path` when no such file exists
    here (rcc.compile("stdlib/gla.rnn") from any directory, as `use gla` reads it), else None."""
    match = _STDLIB_PATH.fullmatch(path.replace(os.sep, "/"))
    if match is None or os.path.exists(path):
        return None
    from importlib import resources
    if not resources.files("rcc.stdlib").joinpath(f"{match.group(1)}.rnn").is_file():
        return None
    return f"stdlib/{match.group(1)}.rnn"


def read_source(source_or_path) -> tuple:
    """(text, filename): a path (str or PathLike naming an existing file, or ending in .rnn) is
    read; any other string is the program text itself. A path `stdlib/NAME.rnn` that names no
    file here is the packaged stdlib's."""
    if isinstance(source_or_path, os.PathLike) or (
            isinstance(source_or_path, str) and "\n" not in source_or_path
            and (source_or_path.endswith(".rnn") or os.path.isfile(source_or_path))):
        path = os.fspath(source_or_path)
        stdlib = packaged_stdlib(path)
        if stdlib is not None:
            from importlib import resources
            ref = resources.files("rcc.stdlib").joinpath(stdlib[len("stdlib/"):])
            return normalized(ref.read_text(encoding="utf-8")), stdlib
        return _read_file(path, _file_span(path)), path
    if not isinstance(source_or_path, str):
        raise TypeError(f"expected .rnn source text or a path, got {type(source_or_path).__name__}")
    return normalized(source_or_path), "<string>"


MAX_SOURCE_BYTES = 1 << 20  # a .rnn file is small: a bound keeps /dev/zero or a huge file out


def normalized(text: str) -> str:
    """Source text as the parser reads it: without a UTF-8 byte-order mark, and with Windows
    (CR LF) and old Mac (CR) line endings as LF."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _read_file(path, span, what=None) -> str:
    what = what or path
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise CompileError(f"cannot read {what}: not a regular file", span)
        if info.st_size > MAX_SOURCE_BYTES:
            raise CompileError(f"cannot read {what}: {info.st_size} bytes, more than the "
                               f"{MAX_SOURCE_BYTES} a source file may have", span)
        with open(path, encoding="utf-8") as f:
            return normalized(f.read(MAX_SOURCE_BYTES + 1))
    except OSError as e:
        raise CompileError(f"cannot read {what}: {e.strerror or e}", span) from None
    except UnicodeDecodeError as e:
        raise CompileError(f"cannot read {what}: not UTF-8 text (byte {e.start})", span) from None


def _file_span(filename, text=None):
    """The start of a file; with its text, its first line shown under the caret (an empty
    file's empty line included)."""
    from .errors import Span
    first = "" if text is None else (text.split("\n", 1)[0] or " ")
    return Span(filename, 1, 1, 1, 2, first)
