"""CellModule: the base class of every generated cell module (dims, inputs, states, results).

Generated modules import only torch and rcc.runtime; nothing here imports lark or sympy.
"""
from __future__ import annotations

import math

import torch

from ..errors import CompileError, Span
from . import ops, varlen
from .cost import choose


def span(filename, line, col, end_col, text) -> Span:
    return Span(filename, line, col, line, end_col, text)


class CellModule(torch.nn.Module):
    """Generated subclasses set the class attributes below and define `_build` and `forward`."""

    CELL = ""
    DIMS: tuple = ()  # ((name, default or None, span), ...)
    STATIC_DIMS: dict = {}  # name -> value fixed when the module was generated
    INPUTS: tuple = ()  # input names, in declaration order
    STATES: tuple = ()
    OUTPUTS: tuple = ()
    # Set by rcc.compile: dims -> a class generated for other values of STATIC_DIMS.
    _respecialize = None
    num_heads = None  # the inputs' head count when given at construction (num_heads=)

    def __new__(cls, *args, **kwargs):
        kwargs, num_heads = cls._options(kwargs)
        dims = cls._bind_dims(args, kwargs)
        fixed = {k: dims[k] for k, v in cls.STATIC_DIMS.items() if dims[k] != v}
        if fixed:
            if cls._respecialize is None:
                name, value = next(iter(fixed.items()))
                raise CompileError(
                    f"dim '{name}' is fixed to {cls.STATIC_DIMS[name]} in this generated module "
                    f"(it sets a loop count or a split); regenerate it with --dims {name}={value}",
                    cls._dim_span(name))
            return cls._respecialize(dims)(**dims, num_heads=num_heads)
        return super().__new__(cls)

    @classmethod
    def _options(cls, kwargs):
        """(the dims' kwargs, num_heads): num_heads= is the head count the inputs must have
        ([B, T, num_heads, *decl]; None: any heads), unless the cell has a dim of that name."""
        if "num_heads" in kwargs and all(n != "num_heads" for n, _, _ in cls.DIMS):
            kwargs = dict(kwargs)
            heads = kwargs.pop("num_heads")
            if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int)
                                      or heads <= 0):
                raise TypeError(f"num_heads must be a positive integer, got {heads!r}")
            return kwargs, heads
        return kwargs, None

    @classmethod
    def _dim_span(cls, name):
        return next(sp for n, _, sp in cls.DIMS if n == name)

    @classmethod
    def _bind_dims(cls, args, kwargs) -> dict:
        names = [n for n, _, _ in cls.DIMS]
        if len(args) > len(names):
            raise TypeError(f"{cls.CELL}() takes {len(names)} dims, got {len(args)}")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise TypeError(f"{cls.CELL}() has no dim {k!r} (dims: {', '.join(names)})")
            if k in given:
                raise TypeError(f"{cls.CELL}() got dim {k!r} twice")
            given[k] = v
        dims = {}
        for name, default, sp in cls.DIMS:
            value = given.get(name, default)
            if value is None:
                raise CompileError(f"dim '{name}' is not bound: pass {name}=... to {cls.CELL}()",
                                   sp)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CompileError(f"dim '{name}' must be a positive integer, got {value!r}", sp)
            dims[name] = int(value)
        return dims

    def __reduce_ex__(self, protocol):
        """copy.deepcopy and pickle (torch.save of a whole model): the class is rebuilt from the
        code it was generated as (rcc.runtime.loader.rebuild), not looked up by a module path
        that exists only in this process; the state is nn.Module's."""
        from .loader import rebuild

        cls = type(self)
        if not hasattr(cls, "RCC_CODE") and not getattr(cls, "PLAN_CLASSES", None):
            raise TypeError(f"{cls.__name__}: a class rcc did not generate cannot be pickled")
        codes = ({p: c.RCC_CODE for p, c in cls.PLAN_CLASSES.items()}
                 if getattr(cls, "PLAN_CLASSES", None) else cls.RCC_CODE)
        return rebuild, (codes, getattr(cls, "PLAN_FACTS", None), dict(self.dims)), \
            self.__getstate__()

    def __init__(self, *args, **kwargs):
        super().__init__()
        kwargs, self.num_heads = self._options(kwargs)
        self.dims = self._bind_dims(args, kwargs)
        self.output_shapes = ()  # each output's declared shape (set by _build)
        self.shapes = self._build(**self.dims)  # declares parameters, returns declared shapes
        self.reset_parameters()
        self._op_key = ops.register(self)  # what torch.ops.rcc.cell finds this module by

    def __setstate__(self, state):
        super().__setstate__(state)
        self._op_key = ops.register(self)  # a copy is another module: it has its own key

    def _build(self, **dims) -> dict:
        raise NotImplementedError

    def reset_parameters(self):
        pass

    def _check_dim(self, value, what, sp, exact=None, failure="") -> int:
        """A shape entry or index bound that depends on dims, checked once they are bound."""
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        if exact is not None and value * 1.0 != exact:
            raise CompileError(f"{what} is {exact:g}, not an integer, for {dims}", sp)
        if value <= 0:
            raise CompileError(f"{failure} when {dims}" if failure else
                               f"{what} is {value} for {dims}; it must be positive", sp)
        return value

    # ---- calling --------------------------------------------------------------------------
    def _bind_inputs(self, args, kwargs) -> dict:
        """Match inputs by position or name: name -> value."""
        if len(args) > len(self.INPUTS):
            raise TypeError(f"{self.CELL} takes {len(self.INPUTS)} inputs, got {len(args)}")
        given = dict(zip(self.INPUTS, args))
        for k, v in kwargs.items():
            if k not in self.INPUTS:
                raise TypeError(f"{self.CELL} has no input {k!r} (inputs: {', '.join(self.INPUTS)})")
            if k in given:
                raise TypeError(f"{self.CELL} got input {k!r} twice")
            given[k] = v
        missing = [n for n in self.INPUTS if n not in given]
        if missing:
            raise TypeError(f"{self.CELL} is missing input {missing[0]!r}")
        return given

    def _inputs(self, args, kwargs):
        """Match inputs by position or name, check [B, T, *heads, *decl], flatten to [N, T, *decl].

        Returns (tensors, layout) where layout = (B, heads, T)."""
        # positional inputs, all of them: the common call needs no matching
        given = (dict(zip(self.INPUTS, args)) if len(args) == len(self.INPUTS) and not kwargs
                 else self._bind_inputs(args, kwargs))
        layout = None
        out = []
        for name in self.INPUTS:
            x = given[name]
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {name!r} must be a torch.Tensor, got {type(x).__name__}")
            decl = self.shapes[name]
            nh = x.dim() - 2 - len(decl)
            if nh < 0 or x.shape[2 + nh:] != decl:
                want = "[B, T, *heads" + "".join(f", {s}" for s in decl) + "]"
                raise ValueError(f"input {name!r} has shape {list(x.shape)} but {self.CELL} "
                                 f"expects {want}")
            this = (x.shape[0], tuple(x.shape[2:2 + nh]), x.shape[1])
            if self.num_heads is not None and this[1] != (self.num_heads,):
                raise ValueError(self._heads_error(name, x, decl))
            if layout is None:
                layout = this
            elif this != layout:
                def sizes(lay):  # [B, T, *heads], as the inputs are laid out
                    return [lay[0], lay[2], *lay[1]]
                raise ValueError(f"input {name!r} has shape {list(x.shape)}: its batch, time and "
                                 f"head sizes {sizes(this)} differ from the first input's "
                                 f"{sizes(layout)} ([B, T, *heads])")
            if x.shape[1] == 0:
                raise ValueError(f"input {name!r} has an empty time axis (T=0)")
            if not x.is_floating_point():
                raise TypeError(f"input {name!r} must be floating point, got {x.dtype}")
            self._check_dtype(name, x)
            # no heads: already [N, T, *decl] (a call costs microseconds: one-step latency)
            out.append(x.movedim(1, 1 + nh).reshape(-1, x.shape[1], *decl) if nh else x)
        return out, layout

    def _heads_error(self, name, x, decl) -> str:
        want = f"[B, T, {self.num_heads}" + "".join(f", {s}" for s in decl) + "]"
        hint = ""
        if x.dim() == 3 + len(decl) and x.shape[1] == self.num_heads:
            hint = " (head-first [B, H, T, ...]? pass x.transpose(1, 2))"
        elif x.dim() == 3 + len(decl) and x.shape[0] == self.num_heads:
            hint = " (head-major [H, B, T, ...]? move the heads to axis 2)"
        return (f"input {name!r} has shape {list(x.shape)} but {self.CELL} (num_heads="
                f"{self.num_heads}) expects {want}{hint}")

    def _check_dtype(self, name, x):
        """An input's dtype must be the params' (a float64 input into a float32 module), except
        under autocast, which casts itself."""
        params = self._parameters
        if not params or torch.is_autocast_enabled(x.device.type):
            return
        p = next(iter(params.values()))
        if p is not None and x.dtype != p.dtype:
            cast = {torch.float64: "double", torch.float32: "float", torch.float16: "half",
                    torch.bfloat16: "bfloat16"}.get(x.dtype, "to(dtype)")
            raise TypeError(f"input {name!r} is {x.dtype} but {self.CELL}'s params are {p.dtype}: "
                            f"call m.{cast}() to run the module in {x.dtype}, or pass "
                            f"{name}.to({p.dtype})")

    def _given_states(self, initial_state, layout) -> list:
        """`initial_state` checked ([B, *heads, *decl]; a dict by state name, or one tensor when
        the cell has one state, flash-linear-attention's habit): a tensor or None per state."""
        B, heads, _ = layout
        given = states_by_name(initial_state, self.STATES, self.CELL) or {}
        for name in given:
            if name not in self.STATES:
                raise ValueError(f"initial_state has unknown state {name!r} "
                                 f"(states: {', '.join(self.STATES)})")
        out = []
        for name in self.STATES:
            s = given.get(name)
            want = (B, *heads, *self.shapes[name])
            if s is not None and (not isinstance(s, torch.Tensor) or s.shape != want):
                got = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"initial state {name!r} has shape {got} but {self.CELL} "
                                 f"expects {list(want)}")
            out.append(s)
        return out

    def _initial_states(self, initial_state, layout, like, defaults):
        """States as [N, *decl]: from `initial_state` (_given_states) or the defaults (functions
        making each state's declared initial value, called only when needed)."""
        heads = layout[1]
        N = like.shape[0]
        out = []
        for name, s, default in zip(self.STATES, self._given_states(initial_state, layout),
                                    defaults):
            decl = self.shapes[name]
            if s is None:
                out.append(default().to(dtype=like.dtype, device=like.device).expand(N, *decl))
                continue
            s = s if s.dtype == like.dtype else s.to(like.dtype)
            # a view, never the caller's tensor itself: _result copies a final state that is a
            # view (a state never updated), so the result does not alias the initial state
            out.append(s.reshape(N, *decl) if heads else s.view_as(s))
        return out

    def _result(self, outputs, states, layout, output_final_state=True):
        """(outputs [B, T, *heads, *o], one tensor or a tuple; final states {name: [B, *heads,
        *decl]}, or None where `output_final_state` is False, as flash-linear-attention's)."""
        B, heads, T = layout
        nh = len(heads)

        def unflatten_seq(y):  # [N, T, *o] -> [B, T, *heads, *o]
            return y.reshape(B, *heads, T, *y.shape[2:]).movedim(1 + nh, 1) if nh else y

        outs = tuple(unflatten_seq(y) for y in outputs)
        if not output_final_state:
            return (outs[0] if len(outs) == 1 else outs), None
        # a final state the caller can write into without writing into what was passed in (as
        # with torch.nn.RNN): a view (of the initial state, of a step's slice) is copied, and a
        # broadcast view of one value (a state never updated) made contiguous
        owned = [s.clone(memory_format=torch.contiguous_format) if s._base is not None else s
                 for s in states]
        final = {name: (s.reshape(B, *heads, *s.shape[1:]) if nh else s).contiguous()
                 for name, s in zip(self.STATES, owned)}
        return (outs[0] if len(outs) == 1 else outs), final

    def step(self, *inputs, cache=None, **kwargs):
        """One step of generation: inputs [B, *heads, *decl] (no time axis), `cache` the Cache
        the last step returned (None: the declared initial states). Returns (outputs [B,
        *heads, *o], the next Cache). Equal to the full sequence's run (rcc.runtime.generation).
        """
        from .generation import step
        return step(self, inputs, kwargs, cache)

    def extra_repr(self) -> str:
        heads = "" if self.num_heads is None else f", num_heads={self.num_heads}"
        return ", ".join(f"{k}={v}" for k, v in self.dims.items()) + heads


# ---- parameter initializers (LANGUAGE.md section 4) -------------------------------------------
def init_default(p: torch.Tensor):
    """uniform(-s, s) with s = 1/sqrt(n), n the size of the last axis (as torch.nn.Linear)."""
    n = p.shape[-1] if p.dim() else 1
    s = 1.0 / math.sqrt(n)
    torch.nn.init.uniform_(p, -s, s)


def init_const(p: torch.Tensor, value: float):
    torch.nn.init.constant_(p, value)


def init_eye(p: torch.Tensor):
    torch.nn.init.eye_(p)


def init_uniform(p, a, b):
    torch.nn.init.uniform_(p, a, b)


def init_normal(p, mean, std):
    torch.nn.init.normal_(p, mean, std)


def init_xavier(p):
    torch.nn.init.xavier_uniform_(p)


def init_orthogonal(p):
    torch.nn.init.orthogonal_(p)


def states_by_name(initial_state, states, owner):
    """`initial_state` as a dict by state name (None stays None): one tensor is the state of a
    one-state cell (flash-linear-attention's and torch.nn.GRU's habit)."""
    if isinstance(initial_state, torch.Tensor):
        if len(states) != 1:
            raise TypeError(f"initial_state is one tensor but {owner} has {len(states)} states: "
                            f"pass a dict {{{', '.join(repr(s) + ': ...' for s in states)}}}")
        return {states[0]: initial_state}
    if initial_state is not None and not isinstance(initial_state, dict):
        raise TypeError(f"initial_state must be a dict of tensors by state name (states: "
                        f"{', '.join(states)}), got {type(initial_state).__name__}")
    return initial_state


def from_torch(cell: torch.nn.Module, source: torch.nn.Module, layer: int = 0,
               reverse: bool = False):
    """Copy the weights of torch.nn.LSTM / GRU / RNN (layer `layer`, the forward direction or
    with `reverse` the backward one) or of LSTMCell / GRUCell / RNNCell into a cell whose params
    use torch's names (weight_ih, weight_hh, bias_ih, bias_hh), as the stdlib's LSTM, GRU and
    Elman cells do; or every layer and direction of torch.nn.LSTM / GRU / RNN into an
    rcc.Stack of such cells (the same num_layers and bidirectional). Returns `cell`."""
    from .stack import Stack

    if isinstance(cell, Stack):
        layers = getattr(source, "num_layers", 1)
        both = getattr(source, "bidirectional", False)
        if (layers, both) != (cell.num_layers, cell.bidirectional):
            raise ValueError(f"{type(source).__name__} has num_layers={layers}, bidirectional="
                             f"{both}; the Stack has num_layers={cell.num_layers}, "
                             f"bidirectional={cell.bidirectional}")
        for k in range(cell.num_layers):
            for rev in ((False, True) if cell.bidirectional else (False,)):
                from_torch(cell.cell(k, rev), source, k, rev)
        return cell
    nonlinearity = getattr(source, "nonlinearity", "tanh")
    if nonlinearity != "tanh" and getattr(cell, "CELL", None) == "Elman":
        raise ValueError(f"{type(source).__name__} has nonlinearity={nonlinearity!r} but rcc's "
                         "stdlib Elman cell is tanh: copy it into a cell written with "
                         f"{nonlinearity} (h' = {nonlinearity}(weight_ih @ x + bias_ih + "
                         "weight_hh @ h + bias_hh))")
    src = dict(source.named_parameters())
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    copied = 0
    with torch.no_grad():
        for name, p in cell.named_parameters():
            key = name + suffix if name + suffix in src or reverse else name
            if key not in src:
                raise ValueError(f"{type(source).__name__} has no parameter {key!r} for {name!r}")
            if tuple(src[key].shape) != tuple(p.shape):
                raise ValueError(f"parameter {name!r}: shape {list(p.shape)} but "
                                 f"{type(source).__name__}.{key} is {list(src[key].shape)}")
            p.copy_(src[key])
            copied += 1
    if copied == 0:
        raise ValueError(f"{type(cell).__name__} has no parameters to copy")
    return cell


class AutoPlan:
    """Mixed into the class rcc.compile(plan='auto') returns: each call runs the plan the cost
    model (rcc.runtime.cost) estimates fastest for its device, length and state size."""

    PLAN_CLASSES: dict = {}  # plan -> generated class (all share _build and parameters)
    PLAN_FACTS: dict = {}  # plan -> operation counts (backends.torch.plans.plan_facts)
    max_iter = None  # Newton's settings, as on a plan='newton' module
    tol = None
    last_stats = None
    chunk_size = 64
    last_plan = None  # the plan the last call ran, and the estimates it chose from
    last_estimates = None

    def forward(self, *args, initial_state=None, output_final_state=True, cu_seqlens=None,
                lengths=None, **kwargs):
        if cu_seqlens is not None or lengths is not None or varlen.is_packed(args, kwargs):
            # each stretch runs the plan the cost model picks for it (rcc.runtime.varlen)
            return varlen.call(self, args, kwargs, initial_state, output_final_state,
                               cu_seqlens, lengths)
        if torch.compiler.is_compiling():  # one op, the plan chosen inside it (rcc.runtime.ops)
            return ops.call(self, args, kwargs, initial_state, output_final_state)
        # the inputs checked before the cost model reads their sizes (a missing input or T=0
        # is the same clear error as on any plan)
        (x, *_), (B, heads, T) = self._inputs(args, kwargs)
        N = B * math.prod(heads)
        facts = {}
        for plan, f in self.PLAN_FACTS.items():
            f = dict(f, state=sum(math.prod(self.shapes[s]) for s in self.STATES) or 1,
                     chunk_size=self.chunk_size)
            if "matrix_state" in f:
                f["key"], f["value"] = self.shapes[f["matrix_state"]][-2:]
            facts[plan] = f
        device = "cuda" if x.device.type == "cuda" else "cpu"  # other devices: the CPU's figures
        self.last_plan, self.last_estimates = choose(self.PLAN_FACTS, facts, device, T, N)
        return self.PLAN_CLASSES[self.last_plan].forward(
            self, *args, initial_state=initial_state, output_final_state=output_final_state,
            **kwargs)
