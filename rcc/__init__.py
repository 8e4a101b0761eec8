"""rcc: a compiler for recurrent cells. `rcc.compile(...)` turns a .rnn cell into a torch Module class.

The compiler (lark, sympy) is imported lazily, so generated modules that import `rcc.runtime`
never load it.
"""
from .errors import CompileError, Span

__version__ = "0.1.0"

_LAZY = {
    "compile": ("rcc.frontcache", "compile"),  # rcc.api.compile, its front end cached
    "generate": ("rcc.api", "generate"),
    "analyze": ("rcc.api", "analyze"),
    "recurrence": ("rcc.pyfrontend", "recurrence"),
    "Input": ("rcc.pyfrontend", "Input"),
    "Param": ("rcc.pyfrontend", "Param"),
    "State": ("rcc.pyfrontend", "State"),
    "Dim": ("rcc.pyfrontend", "Dim"),
    "from_torch": ("rcc.runtime.module", "from_torch"),
    "Stack": ("rcc.runtime.stack", "Stack"),
    "Cache": ("rcc.runtime.generation", "Cache"),
    "Layer": ("rcc.runtime.layer", "Layer"),
    "Feature": ("rcc.runtime.layer", "Feature"),
    "layers": ("rcc.layers", None),
    "lsrl": ("rcc.lsrl", None),
}


# Functions of LANGUAGE.md section 6, usable inside @rcc.recurrence (see rcc.pyfrontend).
_TRACED_FUNCTIONS = frozenset("""
    sigmoid tanh relu silu gelu exp log log1p expm1 softplus logsigmoid sqrt rsqrt abs sign sin cos
    max min logaddexp where sum mean amax logsumexp softmax dot outer l2norm eye zeros ones
    concat stack split chunk
""".split())


def __getattr__(name):
    import importlib

    if name in _LAZY:
        mod, attr = _LAZY[name]
        module = importlib.import_module(mod)
        return module if attr is None else getattr(module, attr)
    if name in _TRACED_FUNCTIONS:  # rcc.sigmoid(...) etc., for @rcc.recurrence functions
        return getattr(importlib.import_module("rcc.pyfrontend"), name)
    raise AttributeError(f"module 'rcc' has no attribute {name!r}")


__all__ = ["CompileError", "Span", "__version__", *_LAZY]
