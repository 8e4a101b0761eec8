"""A cell module as one torch op (`torch.ops.rcc.cell`), for torch.compile and torch.export.

Traced by Dynamo, a cell's forward would be unrolled over T (plan sequential: a recompile for
every new length) or broken where its Python chooses (plan auto's cost model, a C++ kernel's
ctypes call). So under compilation the module calls one custom op instead: its fake
implementation gives the results' shapes from the inputs' (symbolic T and B: no recompile),
its real one runs the module's own eager forward (any plan, any backend), and its backward op
runs that forward again with gradients and differentiates it. The compiled graph thus holds the
cell as flash-attention's kernels are held: opaque, with a forward and a backward, recomputing
the cell's activations in the backward instead of keeping them (as activation checkpointing
does).

Modules are found by a key (`register`) that the traced graph holds as a constant: an op in a
graph or an exported program runs in the process whose module it was traced from.
"""
from __future__ import annotations

import itertools
import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import cpp

# The dispatcher's thread-local key sets outside any op, taken when rcc.runtime is imported: an
# op's implementation runs with autograd's keys excluded, and the backward op must record a graph
# of its forward again to differentiate it (the sets restored, not written out: private API).
_OUTSIDE_OPS = (torch._C._dispatch_tls_local_include_set(),
                torch._C._dispatch_tls_local_exclude_set())
_MODULES: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()
_COUNT = itertools.count()


def register(module) -> str:
    """A key naming `module` in this process (each instance, copies included, has its own:
    non-parameter settings such as Newton's tolerance may differ). It holds rcc's version: a
    graph Inductor cached on disk (keyed by its code, which holds the key, not by the ops'
    schemas) is not run against another version's ops."""
    from .. import __version__

    key = f"{type(module).CELL}#{next(_COUNT)}@{__version__}"
    _MODULES[key] = module
    return key


def _module(key: str):
    found = _MODULES.get(key)
    if found is None:
        raise RuntimeError(f"rcc op: module {key!r} does not exist in this process (a graph or "
                           f"exported program holding an rcc cell runs where its module lives)")
    return found


def _run(module, inputs, params, given, states, edge_index=None):
    """The module's eager forward on these tensors as its inputs, params and initial states
    (`given`: the states' names, comma-separated; `edge_index`: a dag cell's graph): (outputs,
    final states), each a list in the class's order."""
    given = dict(zip(given.split(",") if given else (), states))
    named = dict(zip(module._parameters, params))
    kwargs = {"initial_state": given or None}
    if edge_index is not None:
        kwargs["edge_index"] = edge_index
    out, final = torch.func.functional_call(module, named, tuple(inputs), kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    return outs, [final[s] for s in module.STATES]


def _owned(results, inputs):
    """Results contiguous (as the fake implementation makes them) that alias no input and no
    other result (a custom op's contract): a value passed through, or one output equal to
    another, is copied."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    out = []
    for r in results:
        r = r.contiguous()
        ptr = r.untyped_storage().data_ptr()
        if ptr in seen:
            r = r.clone()
            ptr = r.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(r)
    return out


@torch.library.custom_op("rcc::cell", mutates_args=())
def cell(key: str, inputs: list[Tensor], params: list[Tensor], given: str,
         states: list[Tensor], edge_index: Optional[Tensor] = None) -> list[Tensor]:
    """A cell module's forward: its outputs, then its final states."""
    outs, finals = _run(_module(key), inputs, params, given, states, edge_index)
    return _owned(outs + finals, [*inputs, *params, *states])


@cell.register_fake
def _cell_fake(key, inputs, params, given, states, edge_index=None):
    """Outputs [B, *steps, *heads, *o] (steps: T; a graph's nodes, N or X, Y) and final states
    [B, *heads, *decl] (a graph's: per node, or per edge: [B, E, ...], [B, X, Y, 2, ...])."""
    module = _module(key)
    x = inputs[0]
    topology = getattr(module, "TOPOLOGY", "seq")
    lead = 2 if topology == "grid2d" else 1
    B, steps = x.shape[0], tuple(x.shape[1:1 + lead])
    heads = tuple(x.shape[1 + lead:x.dim() - len(module.shapes[module.INPUTS[0]])])
    outs = [x.new_empty((B, *steps, *heads, *shape)) for shape in module.output_shapes]
    finals = []
    for s in module.STATES:
        if topology == "seq":
            where = ()
        elif s not in getattr(module, "EDGE_STATES", ()):
            where = steps
        else:
            where = (*steps, 2) if topology == "grid2d" else (edge_index.shape[1],)
        finals.append(x.new_empty((B, *where, *heads, *module.shapes[s])))
    return outs + finals


@torch.library.custom_op("rcc::cell_backward", mutates_args=())
def cell_backward(key: str, inputs: list[Tensor], params: list[Tensor], given: str,
                  states: list[Tensor], grads: list[Optional[Tensor]], needed: list[bool],
                  edge_index: Optional[Tensor] = None) -> list[Tensor]:
    """The gradients of `cell`'s results (weighted by `grads`, None for a result not used)
    with respect to its inputs, params and given states, in that order (zeros where `needed`
    says autograd does not ask for one): the forward is run again with gradients."""
    leaves = [t.detach().requires_grad_(need) for t, need in zip((*inputs, *params, *states),
                                                                  needed)]
    n_in, n_par = len(inputs), len(params)
    with torch._C._ForceDispatchKeyGuard(*_OUTSIDE_OPS), torch.enable_grad():
        outs, finals = _run(_module(key), leaves[:n_in], leaves[n_in:n_in + n_par], given,
                            leaves[n_in + n_par:], edge_index)
        pairs = [(r, g) for r, g in zip(outs + finals, grads) if g is not None and r.requires_grad]
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs],
                                         allow_unused=True) if pairs and wanted else ())
        found = [next(found, None) if t.requires_grad else None for t in leaves]
    # laid out as the fake implementation says (empty_like: the strides of what they are for)
    return [torch.zeros_like(t) if g is None else
            g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)
            for t, g in zip(leaves, found)]


@cell_backward.register_fake
def _cell_backward_fake(key, inputs, params, given, states, grads, needed, edge_index=None):
    return [torch.empty_like(t) for t in (*inputs, *params, *states)]


def _setup(ctx, inputs, output):
    key, ins, params, given, states, *rest = inputs  # edge_index when given
    edge_index = rest[0] if rest else None
    ctx.key, ctx.given, ctx.counts = key, given, (len(ins), len(params))
    ctx.graph = edge_index is not None
    ctx.save_for_backward(*ins, *params, *states, *((edge_index,) if ctx.graph else ()))


def _backward(ctx, grads):
    n_in, n_par = ctx.counts
    saved = list(ctx.saved_tensors)
    edge_index = saved.pop() if ctx.graph else None
    _, need_in, need_par, _, need_states, *_ = ctx.needs_input_grad
    found = cell_backward(ctx.key, saved[:n_in], saved[n_in:n_in + n_par], ctx.given,
                          saved[n_in + n_par:], list(grads),
                          [*need_in, *need_par, *need_states], edge_index)
    grads_in = (None, found[:n_in], found[n_in:n_in + n_par], None, found[n_in + n_par:])
    return (*grads_in, None) if len(ctx.needs_input_grad) == 6 else grads_in


cell.register_autograd(_backward, setup_context=_setup)


def call(module, args, kwargs, initial_state, output_final_state=True, edge_index=None):
    """`module(*args, initial_state=..., **kwargs)` as the op (what a generated forward runs
    under torch.compile): the call checked as in eager, results returned as in eager. A cell
    over a graph is checked inside the op (its checks build the schedule: data)."""
    given = module._bind_inputs(args, kwargs)
    if getattr(module, "TOPOLOGY", "seq") == "seq":
        _, layout = module._inputs(args, kwargs)  # the same checks and errors as eager
        states = dict(zip(module.STATES, module._given_states(initial_state, layout)))
    else:
        states = dict(initial_state or {})
    states = {n: s for n, s in states.items() if s is not None}
    results = torch.ops.rcc.cell(module._op_key, [given[n] for n in module.INPUTS],
                                 list(module._parameters.values()), ",".join(states),
                                 list(states.values()), edge_index)
    n = len(module.OUTPUTS)
    outs = results[:n]
    final = dict(zip(module.STATES, results[n:])) if output_final_state else None
    return (outs[0] if n == 1 else tuple(outs)), final


# ---- backend cpp: its loop over time as an op, forward and backward kernels ---------------------
# The module's forward is traced (the input projections before the loop and what follows it are
# Inductor's to fuse); the loop is one op whose backward is the kernel's own backward entry
# point, reading the states the forward saved (no recomputation).
@torch.library.custom_op("rcc::cpp_loop", mutates_args=())
def cpp_loop(kernel: str, entry: str, T: int, N: int, n_seq: int, n_const: int,
             out_sizes: list[int], save: bool, tensors: list[Tensor]) -> list[Tensor]:
    """rcc.runtime.cpp.run's loop: outputs [N, T, size], final states, and with `save` the
    states of every step (what the backward reads)."""
    meta = (cpp.by_key(kernel), T, N, n_seq, n_const, [(n,) for n in out_sizes])
    results, (_, _, _, saved) = cpp._forward(meta, tensors, save, entry)
    return [*results, *saved] if save else list(results)


@cpp_loop.register_fake
def _cpp_loop_fake(kernel, entry, T, N, n_seq, n_const, out_sizes, save, tensors):
    x, states = tensors[0], tensors[n_seq + n_const:]
    outs = [x.new_empty((N, T, n)) for n in out_sizes]
    finals = [s.new_empty(s.shape) for s in states]
    saved = [s.new_empty((T, N, math.prod(s.shape[1:]))) for s in states] if save else []
    return outs + finals + saved


@torch.library.custom_op("rcc::cpp_loop_backward", mutates_args=())
def cpp_loop_backward(kernel: str, T: int, N: int, n_seq: int, n_const: int,
                      out_sizes: list[int], tensors: list[Tensor], saved: list[Tensor],
                      grads: list[Optional[Tensor]]) -> list[Tensor]:
    """The gradients of cpp_loop's tensors (contiguous) from its results'."""
    meta = (cpp.by_key(kernel), T, N, n_seq, n_const, [(n,) for n in out_sizes])
    kept = (*cpp._laid_out(n_seq, n_const, tensors), saved)
    found = cpp.backward(meta, kept, [t.shape for t in tensors], grads)
    return [g.contiguous() for g in found]


@cpp_loop_backward.register_fake
def _cpp_loop_backward_fake(kernel, T, N, n_seq, n_const, out_sizes, tensors, saved, grads):
    return [t.new_empty(t.shape) for t in tensors]


def _cpp_setup(ctx, inputs, output):
    kernel, _, T, N, n_seq, n_const, out_sizes, save, tensors = inputs
    ctx.args, ctx.count = (kernel, T, N, n_seq, n_const, out_sizes), len(tensors)
    ctx.results = len(out_sizes) + len(tensors) - n_seq - n_const  # outputs and final states
    ctx.save_for_backward(*tensors, *(output[ctx.results:] if save else ()))


def _cpp_backward(ctx, grads):
    saved = ctx.saved_tensors
    if len(saved) == ctx.count:
        raise RuntimeError("rcc: a cpp loop run without gradients (save=False) was differentiated")
    found = cpp_loop_backward(*ctx.args, list(saved[:ctx.count]), list(saved[ctx.count:]),
                              list(grads[:ctx.results]))
    return None, None, None, None, None, None, None, None, found


cpp_loop.register_autograd(_cpp_backward, setup_context=_cpp_setup)
