"""Load a .rnn program: parse, follow `use` imports, collect fns and cells, pick one cell."""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from . import syntax as S
from .elaborate import BUILTINS
from .errors import CompileError
from .parser import parse
from .source import MAX_SOURCE_BYTES, _file_span, _read_file, normalized, read_source  # noqa: F401


@dataclass
class Program:
    cells: dict  # name -> S.Cell, in definition order
    fns: dict  # name -> S.FnDef
    texts: dict  # filename -> source text (every file read, for the content hash)


def load(text: str, filename: str) -> Program:
    prog = Program({}, {}, {})
    _load_into(prog, text, filename, stack=())
    return prog


def _stdlib_text(name: str, span) -> tuple:
    try:
        ref = resources.files("rcc.stdlib").joinpath(f"{name}.rnn")
        return ref.read_text(encoding="utf-8"), f"stdlib/{name}.rnn"
    except (FileNotFoundError, OSError):
        raise CompileError(f"no stdlib module '{name}' (stdlib/{name}.rnn)", span) from None


def _load_into(prog: Program, text: str, filename: str, stack: tuple):
    if filename in prog.texts:
        return  # already loaded through another `use`
    prog.texts[filename] = text
    module = parse(text, filename)
    for item in module.items:
        if isinstance(item, S.Use):
            if item.is_path:
                base = os.path.dirname(filename) if not filename.startswith("<") else os.getcwd()
                path = os.path.normpath(os.path.join(base, item.target))
                if not path.endswith(".rnn"):  # never read (and echo) another kind of file
                    raise CompileError(f"'use \"{item.target}\"': only .rnn files can be used",
                                       item.span)
                if os.path.realpath(path) in {os.path.realpath(f) for f in stack + (filename,)}:
                    raise CompileError(f"'use \"{item.target}\"' imports itself in a cycle",
                                       item.span)
                sub = _read_file(path, item.span, f"'{item.target}' (looked at {path})")
                _load_into(prog, sub, path, stack + (filename,))
            else:
                sub, name = _stdlib_text(item.target, item.span)
                if name in stack:
                    raise CompileError(f"'use {item.target}' imports itself in a cycle", item.span)
                _load_into(prog, sub, name, stack + (filename,))
        elif isinstance(item, S.FnDef):
            if item.name in BUILTINS:
                raise CompileError(f"fn '{item.name}' shadows a built-in function", item.span)
            if item.name in prog.fns:
                raise CompileError(f"fn '{item.name}' is defined twice", item.span)
            if len(set(item.params)) != len(item.params):
                raise CompileError(f"fn '{item.name}' has a repeated parameter name", item.span)
            prog.fns[item.name] = item
        elif isinstance(item, S.Cell):
            if item.name in prog.cells:
                raise CompileError(f"cell '{item.name}' is defined twice", item.span)
            prog.cells[item.name] = item


def pick_cell(prog: Program, cell: str | None, filename: str) -> S.Cell:
    if cell is not None:
        if cell not in prog.cells:
            names = ", ".join(prog.cells) or "none"
            where = next(iter(prog.cells.values())).span if prog.cells else \
                _file_span(filename, prog.texts.get(filename))
            raise CompileError(f"no cell named '{cell}' (cells: {names})", where)
        return prog.cells[cell]
    own = [c for c in prog.cells.values() if c.span.filename == filename]
    if len(own) == 1:
        return own[0]
    if not own:
        text = prog.texts.get(filename)
        raise CompileError("no cell defined in this file" + ("" if (text or "").strip() else
                                                             " (it is empty)"),
                           _file_span(filename, text))
    raise CompileError(f"{len(own)} cells are defined ({', '.join(c.name for c in own)}); "
                       "choose one with cell=\"Name\" (or --cell Name)", own[1].span)
