"""rcc.compile with the front end's results cached: compiling a source compiled before (the same
text, the same files it uses, the same choices, the same rcc) loads the generated code it gave,
without parsing, elaborating, analysing or printing, and without importing lark or sympy. This is
what makes a second process's first call cheap.

An entry, RCC_CACHE_DIR/front/<key>.json, holds what the source used (each file's name and
SHA-256) and the content keys of the generated modules (with the cost model's facts for plan
auto). It is used only when every file it names still has that content, and every module it names
is in the cache with code whose hash is its key: anything else is a miss, and the compiler runs.
The key covers the text, its name, the cell, backend, plan and dims, and rcc's own source files.
Backend triton is not cached here (its classes depend on the GPU found at compile time).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import resources

from .runtime.cache import cache_dir, hold, private_dir
from .runtime.loader import auto_class, class_for_code, key_of
from .source import read_source


@functools.lru_cache(maxsize=1)
def rcc_fingerprint() -> str:
    """A hash of rcc's own source (the compiler, the backends, the grammar): generated code from
    another rcc is never reused."""
    h = hashlib.sha256()
    for package in ("rcc", "rcc.backends", "rcc.grammar"):
        root = resources.files(package)
        for path in sorted(_files(root), key=str):
            h.update(str(path.relative_to(root) if hasattr(path, "relative_to") else path).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _files(folder):
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name != "__pycache__":
            yield from _files(entry)
        elif entry.name.endswith((".py", ".lark")):
            yield entry


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _entry_path(key: str) -> str:
    return os.path.join(private_dir(os.path.join(private_dir(cache_dir()), "front")), key + ".json")


def entry_key(text, filename, cell, backend, plan, dims) -> str:
    what = [rcc_fingerprint(), text, filename, cell, backend, plan, sorted(dims.items())]
    return _sha(json.dumps(what, sort_keys=True, default=str))[:32]


def _dependency_text(name, main, text):
    """The current text of a file a source used, or None where it cannot be read."""
    from .source import _read_file

    if name == main:
        return text
    if name.startswith("stdlib/"):  # `use NAME`: rcc's stdlib
        try:
            return resources.files("rcc.stdlib").joinpath(name[len("stdlib/"):]).read_text(
                encoding="utf-8")
        except (OSError, ValueError):
            pass
    try:
        return _read_file(name, None)
    except Exception:  # noqa: BLE001 (a file that cannot be read now: a miss)
        return None


def _module_code(key: str):
    try:
        with open(os.path.join(private_dir(cache_dir()), f"rcc_{key}.py"), encoding="utf-8") as f:
            code = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    return code if key_of(code) == key else None


def lookup(key, text, filename):
    """The class a former compile of this source gave, or None."""
    try:
        with open(_entry_path(key), encoding="utf-8") as f:
            entry = json.load(f)
        deps, codes, facts = entry["deps"], entry["codes"], entry["facts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, sha in deps:
        now = _dependency_text(name, filename, text)
        if now is None or _sha(now) != sha:
            return None
    keys = codes if isinstance(codes, dict) else {"": codes}
    loaded = {plan: _module_code(k) for plan, k in keys.items()}
    if any(code is None for code in loaded.values()):
        return None
    if isinstance(codes, dict):
        return auto_class({plan: class_for_code(code) for plan, code in loaded.items()}, facts)
    return class_for_code(loaded[""])


def store(key, texts: dict, cls) -> None:
    """Record what `cls` was generated from (a class the compiler made: plan auto's or one
    plan's; a class deferred to its dims is not recorded)."""
    if getattr(cls, "PLAN_CLASSES", None):
        texts_of = {plan: c.RCC_CODE for plan, c in cls.PLAN_CLASSES.items()}
    elif getattr(cls, "RCC_CODE", None):
        texts_of = {"": cls.RCC_CODE}
    else:
        return
    codes = {plan: key_of(code) for plan, code in texts_of.items()}
    codes = codes if "" not in codes else codes[""]
    entry = {"deps": sorted([name, _sha(t)] for name, t in texts.items()), "codes": codes,
             "facts": getattr(cls, "PLAN_FACTS", None)}
    try:
        for code in texts_of.values():  # as rcc wrote them (a planted file is replaced)
            hold(os.path.join(private_dir(cache_dir()), f"rcc_{key_of(code)}.py"), code)
        hold(_entry_path(key), json.dumps(entry, sort_keys=True))
    except OSError:
        pass  # a read-only cache: compile every time


def _uncached(*args):
    from . import api
    return api.compile(*args)


def compile(source_or_path, cell=None, backend="auto", plan="auto", dims=None):  # noqa: A001
    """Compile a cell to a torch.nn.Module class; instantiate it with the cell's dims.

    source_or_path: a .rnn file's path (absolute, relative, or a stdlib name such as
    "stdlib/gla.rnn") or the cell's source text. cell: which cell of a file with several.
    backend: "torch" (the default, "auto"), "cpp" (a C++ loop for CPU) or "triton" (GPU
    kernels; needs the rcc[triton] extra). plan: "sequential", "scan", "chunk", "newton", or
    "auto" (the cost model picks a legal plan per call). dims: values of the cell's dims, the
    defaults when the class is instantiated (a dim that sets a loop count or a split needs one
    before code exists: here, or at instantiation).

    The class is called as `m(*inputs, initial_state=None, output_final_state=True,
    cu_seqlens=None, lengths=None)`: inputs [B, T, *heads, *decl], returning (outputs,
    final_state); docs/language.md section 12. Bad cells raise CompileError, located.

    A source compiled before (same text, same used files, same arguments, same rcc) loads the
    code it gave from RCC_CACHE_DIR without running the compiler (rcc.frontcache;
    RCC_NO_FRONT_CACHE=1 turns that off)."""
    dims = dict(dims or {})
    key = None
    if backend != "triton" and not os.environ.get("RCC_NO_FRONT_CACHE"):
        try:
            text, filename = read_source(source_or_path)
        except Exception:  # noqa: BLE001 (the compiler reports it, located)
            text = None
        if text is not None:
            key = entry_key(text, filename, cell, backend, plan, dims)
            cls = lookup(key, text, filename)
            if cls is not None:
                cls._respecialize = staticmethod(
                    lambda all_dims: _uncached(source_or_path, cell, backend, plan,
                                               {**dims, **all_dims}))
                return cls
    from .api import compile_program

    cls, texts = compile_program(source_or_path, cell, backend, plan, dims)
    if key is not None:
        store(key, texts, cls)
    return cls

