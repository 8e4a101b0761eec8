"""Loading generated modules: the code is written to the cache under its content key and imported
from there; pickled and deep-copied modules are rebuilt from the code their class carries.

Nothing here imports lark or sympy: unpickling a model needs torch and rcc.runtime only.
"""
from __future__ import annotations

import builtins
import hashlib
import linecache
import os
import sys

import torch

from .cache import cache_dir, hold, private_dir

CLASSES: dict = {}  # content key -> class, for this process


def key_of(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()[:24]


def class_for_code(code: str):
    """The class the generated `code` defines (loaded once per process), carrying its code."""
    key = key_of(code)
    if key not in CLASSES:
        cls = _load_class(code, key)
        cls.RCC_CODE = code
        CLASSES[key] = cls
    return CLASSES[key]


def auto_class(classes: dict, facts: dict):
    """The class running per call the plan the cost model picks among `classes` (plan ->
    generated class; rcc.runtime.module.AutoPlan)."""
    from .module import AutoPlan

    key = "auto:" + "|".join(c.__module__ for c in classes.values())  # the plans' code hashes
    if key not in CLASSES:
        base = classes["sequential"]
        CLASSES[key] = type(base.__name__, (AutoPlan, base), {
            "__module__": base.__module__, "PLAN_CLASSES": classes, "PLAN_FACTS": facts,
            "forward": AutoPlan.forward})
    return CLASSES[key]


def rebuild(codes, facts, dims):
    """An instance (before its state is set) of the class generated from `codes` (one text, or
    plan -> text with the cost model's `facts` for plan auto), for `dims`: what copy and pickle
    call (rcc.runtime.module.CellModule.__reduce_ex__)."""
    if isinstance(codes, dict):
        cls = auto_class({p: class_for_code(c) for p, c in codes.items()}, facts)
    else:
        cls = class_for_code(codes)
    return cls.__new__(cls, **dims)


def _load_class(code: str, key: str):
    """Write the module to the cache (atomically, where the file is missing or is not this code:
    a planted or truncated file is replaced) and run the code rcc has in memory under that file's
    name, so tracebacks and inspect show the generated lines: what runs is always `code`."""
    try:
        path = os.path.join(private_dir(cache_dir()), f"rcc_{key}.py")
        hold(path, code)
    except PermissionError:
        raise
    except OSError:
        path = None  # read-only home: keep the module in memory only
    name = f"rcc_generated_{key}"
    filename = path or f"<rcc {key}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    module = type(sys)(name)
    module.__file__ = filename
    exec(builtins.compile(code, filename, "exec"), module.__dict__)
    sys.modules[name] = module
    classes = [v for v in module.__dict__.values()
               if isinstance(v, type) and issubclass(v, torch.nn.Module) and v.__module__ == name]
    return classes[0]
