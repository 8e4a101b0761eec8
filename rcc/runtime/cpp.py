"""Backend 'cpp' at run time: build a generated C++ kernel with the system compiler, cache the
shared object by content, load it with ctypes and run it from torch with gradients.

Generated modules call `kernel(source, dims)` once per dims and `run(...)` per call. The kernel's
entry points take two arrays (sizes and pointers; backends/cpp/kernel.py documents the layout),
so one C signature serves every cell.
"""
from __future__ import annotations

import array
import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading

import torch

from .cache import cache_dir, intact, locked, private_dir, record
from .layout import check_built_for, rows

# -fno-math-errno: nothing reads errno, and it lets loops of exp/tanh use vector math (the
# kernel prelude says how); -lm brings glibc's libmvec where it exists
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
_BY_SOURCE: dict = {}  # (source, dims) -> Kernel, for this process
_BY_KEY: dict = {}  # Kernel.key -> Kernel: what rcc.runtime.ops' cpp_loop op is given
_REAL = {torch.float32: "float", torch.float64: "double"}
_POINTER = "Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "L"  # array typecode of a pointer
_IDENTITY: dict = {}  # compiler -> what makes its output differ (version, this CPU)


class CompilerNotFound(RuntimeError):
    pass


def compiler() -> str:
    """The C++ compiler: $CXX, else the first of g++, clang++, c++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise CompilerNotFound(
        f"backend 'cpp' needs a C++17 compiler and found none ({', '.join(names)} not on PATH); "
        "install g++ or clang++, set CXX, or use backend='torch'")


def _identity(cxx: str) -> str:
    """The compiler's version, the CPU's model and its ISA flags (what -march=native resolves
    to): -march=native code is only valid there."""
    if cxx not in _IDENTITY:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        cpu = []
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(("model name", "flags")) and len(cpu) < 2:
                        cpu.append(line.strip())
        except OSError:
            pass
        _IDENTITY[cxx] = version.splitlines()[0] if version else cxx
        _IDENTITY[cxx] += "|" + "|".join(cpu)
    return _IDENTITY[cxx]


PARTS = {"forward": 1, "backward": 2, "whole_steps": 3}  # RCC_PART of each entry point's build
# Calls of at most this many rows (batch x steps) without gradients run the kernel's whole-step
# entry point (nothing hoisted: the input projections in the loop too); measured in
# benchmarks/cpu.py's decode table
FEW_ROWS = 8


class Kernel:
    """One kernel source with its dims set, built per float type and direction on first use.
    The forward is built first (about half a second). The first call that will need a backward
    starts the backward's build (the longer one) in a background thread while its forward runs:
    a forward-only model never builds it, and a module made in float32 and then converted
    (.double()) builds no float32 backward. float64 is only built for a model that runs in
    float64."""

    def __init__(self, text: str):
        self.text = text
        self.key = hashlib.sha256(text.encode()).hexdigest()[:24]
        _BY_KEY[self.key] = self
        self.paths = {}  # (direction, dtype) -> shared object
        self._fns = {}  # (direction, dtype) -> C function
        self._libs = []  # keeps the libraries loaded
        self._pending = {}  # (direction, dtype) -> _Build running in the background

    def build(self, dtype, direction="forward") -> "Kernel":
        if (direction, dtype) not in self._fns:
            if dtype not in _REAL:
                raise TypeError(f"backend 'cpp' runs float32 and float64, not {dtype}")
            pending = self._pending.pop((direction, dtype), None)
            if pending is not None:
                pending.finish()  # re-raises a failed background build
            self._load(dtype, direction)
        return self

    def start_backward(self, dtype) -> None:
        """Build the backward for `dtype` in the background, unless it is built or building."""
        if ("backward", dtype) not in self._fns and ("backward", dtype) not in self._pending \
                and dtype in _REAL:
            self._pending["backward", dtype] = _Build(self._source(dtype, "backward"))

    def wait(self) -> "Kernel":
        """Finish the builds running in the background (and load them)."""
        for direction, dtype in list(self._pending):
            self.build(dtype, direction)
        return self

    def _source(self, dtype, direction):
        """(compiler, text, cache key) of one direction's build."""
        cxx = compiler()
        text = f"#define RCC_REAL {_REAL[dtype]}\n#define RCC_PART {PARTS[direction]}\n" + self.text
        key = hashlib.sha256("\0".join((text, _identity(cxx), *FLAGS, *LIBS)).encode())
        return cxx, text, key.hexdigest()[:24]

    def _load(self, dtype, direction):
        cxx, text, key = self._source(dtype, direction)
        path = _cached(key)
        if not intact(path):  # missing, corrupt, or not what rcc built: (re)build it
            _build(cxx, text, key)
        lib = ctypes.CDLL(path)
        fn = getattr(lib, f"rcc_{direction}")
        fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p)  # long[], void*[]
        fn.restype = None
        self._fns[direction, dtype] = fn
        self._libs.append(lib)
        self.paths[direction, dtype] = path

    def __call__(self, direction, dtype, sizes, tensors):
        """Run `direction` on `tensors` (None passes a null pointer)."""
        fn = self._fns.get((direction, dtype)) or self.build(dtype, direction)._fns[direction, dtype]
        # array.array is the cheapest C array to build from Python (a call should cost little
        # beside one step of a small cell)
        size = array.array("l", sizes)  # C long
        ptrs = array.array(_POINTER, [0 if t is None else t.data_ptr() for t in tensors])
        fn(size.buffer_info()[0], ptrs.buffer_info()[0])


class _Build:
    """A build running in a thread (the compiler is another process: the GIL is free)."""

    def __init__(self, source):
        cxx, text, key = source
        self.error = None
        if intact(_cached(key)):
            self.thread = None
            return
        # a daemon: a forward-only script does not wait at exit for its backward's build
        self.thread = threading.Thread(target=self._run, args=(cxx, text, key),
                                       name=f"rcc-build-{key}", daemon=True)
        self.thread.start()

    def _run(self, cxx, text, key):
        try:
            _build(cxx, text, key)
        except BaseException as e:  # re-raised where the build is needed
            self.error = e

    def finish(self):
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error


def kernel(source: str, dims: tuple) -> Kernel:
    """The kernel of `source` with its dims (RCC_DIM0, ...) set to `dims`, one per process;
    `.build(dtype)` loads it from the on-disk cache or compiles it."""
    found = _BY_SOURCE.get((source, dims))  # every call: a dict lookup (str hashes are cached)
    if found is None:
        text = "".join(f"#define RCC_DIM{k} {int(v)}\n" for k, v in enumerate(dims)) + source
        found = _BY_SOURCE[source, dims] = Kernel(text)
    return found


def _cached(key: str) -> str:
    return os.path.join(private_dir(cache_dir()), "cpp", f"rcc_{key}.so")


def _build(cxx: str, text: str, key: str) -> None:
    """Compile `text` into the cache's shared object for `key`. Writes go to temporary files
    renamed into place, so concurrent builds never see half a file."""
    path = _cached(key)
    directory = private_dir(os.path.dirname(path))
    with locked(path):  # another process building the same kernel: wait, then use its result
        if not intact(path):
            _compile(cxx, text, key, path, directory)


def _compile(cxx, text, key, path, directory):
    fd, src = tempfile.mkstemp(dir=directory, prefix=f"rcc_{key}_", suffix=".cpp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp = src[:-4] + ".so.tmp"
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", tmp, src, *LIBS], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the C++ compiler failed on rcc's generated kernel (an rcc bug; "
                               f"the source is kept at {src}):\n{done.stderr[-4000:]}")
        os.replace(tmp, path)
        record(path)  # its hash: what a later load checks
        os.replace(src, path[:-3] + ".cpp")  # kept beside it, for reading
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def by_key(key: str) -> Kernel:
    return _BY_KEY[key]


def few_rows(N, T) -> bool:
    """Whether a call runs the whole-step entry point (decoding: a few rows, no gradients).
    Never under torch.compile: the size test would be a guard, a recompile where it flips."""
    return not torch.compiler.is_compiling() and N * T <= FEW_ROWS and not torch.is_grad_enabled()


def run(kern: Kernel, T: int, N: int, seq, consts, states, out_shapes, built_for):
    """Run the loop over time. seq: tensors [N, T, *shape] (any strides); consts: tensors;
    states: initial states [N, *shape]; out_shapes: each output's declared shape; built_for:
    what the kernel was built for (rcc.runtime.layout.check_built_for). Returns (outputs
    [N, T, *shape], final states [N, *shape]), differentiable by every tensor."""
    tensors = (*seq, *consts, *states)
    check_built_for("backend 'cpp'", N * T, N, tensors, built_for)
    meta = (kern, T, N, len(seq), len(consts), out_shapes)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():  # the loop as an op with its backward (rcc.runtime.ops)
        results = torch.ops.rcc.cpp_loop(kern.key, "forward", T, N, len(seq), len(consts),
                                         [math.prod(s) for s in out_shapes], grad, list(tensors))
        outs = [y.view(N, T, *s) for y, s in zip(results, out_shapes)]
        return outs, list(results[len(out_shapes):len(out_shapes) + len(states)])
    if grad:
        results = _Loop.apply(meta, *tensors)
    else:  # no graph to record: skip autograd.Function's bookkeeping (one-step latency)
        results = _forward(meta, tensors, save=False)[0]
    return _split(results, len(out_shapes))


def whole_steps(kern: Kernel, T: int, N: int, inputs, consts, states, out_shapes, built_for):
    """As `run`, without gradients, on the kernel's entry point that computes everything per
    step (rcc_whole_steps): `inputs` are the cell's inputs, not their projections (few_rows)."""
    check_built_for("backend 'cpp'", N * T, N, (*inputs, *consts, *states), built_for)
    results = _forward((kern, T, N, len(inputs), len(consts), out_shapes),
                       (*inputs, *consts, *states), False, "whole_steps")[0]
    return _split(results, len(out_shapes))


def _split(results, n_out):
    """(outputs, final states) as two lists."""
    return list(results[:n_out]), list(results[n_out:])


def _forward(meta, tensors, save, entry="forward"):
    """Outputs [N, T, ...] and final states; and what backward needs when `save`. One pass over
    the tensors checks and lays them out: a call should cost little beside one step of a small
    cell (decoding)."""
    kern, T, N, n_seq, n_const, out_shapes = meta
    dtype = _one_dtype(tensors)
    sizes = [N, T, torch.get_num_threads(), int(save)]
    seq, consts, states = _laid_out(n_seq, n_const, tensors)
    for x in seq:
        sizes += [x.stride(1), x.stride(0)]  # [N, T, ...] read as [T, N, ...]
    for shape in out_shapes:
        row = math.prod(shape)
        sizes += [row, T * row]
    given = tensors[n_seq + n_const:]
    outs = [torch.empty(N, T, *shape, dtype=dtype) for shape in out_shapes]
    finals = [torch.empty(s.shape, dtype=dtype) for s in given]  # [N, *decl], row-major
    saved = [torch.empty(T, *s.shape, dtype=dtype) for s in states] if save else [None] * len(states)
    if save:
        kern.start_backward(dtype)  # built while this forward runs
    kern(entry, dtype, sizes, [*seq, *consts, *states, *outs, *finals, *saved])
    return (*outs, *finals), (seq, consts, states, saved)


def _laid_out(n_seq, n_const, tensors):
    """(seq, consts, states) as the kernel reads them: sequences [N, T, row] (a view where the
    row is contiguous), consts contiguous, states [N, row] contiguous."""
    seq = [rows(x, 2) for x in tensors[:n_seq]]
    consts = [c if c.is_contiguous() else c.contiguous() for c in tensors[n_seq:n_seq + n_const]]
    states = [s if s.dim() == 2 and s.is_contiguous() else rows(s, 1).contiguous()
              for s in tensors[n_seq + n_const:]]
    return seq, consts, states


def _one_dtype(tensors):
    """The float type all `tensors` share (CPU tensors, float32 or float64), or a clear error."""
    dtype = tensors[0].dtype
    if dtype not in _REAL:
        raise TypeError(f"backend 'cpp' runs float32 and float64, not {dtype}")
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            _refuse(t, dtype)
    return dtype


def _refuse(t, dtype):
    if not t.is_cpu:
        raise RuntimeError(f"backend 'cpp' runs on CPU tensors; got one on {t.device} "
                           "(use backend='torch' on a GPU)")
    raise TypeError(f"backend 'cpp' needs one float dtype for inputs, params and states; "
                    f"got {dtype} and {t.dtype}")


class _Loop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, *tensors):
        results, kept = _forward(meta, tensors, save=True)
        # saved for autograd's in-place check only (backward reads the laid-out `kept`): a param
        # modified in place between forward and backward raises as with torch's own ops
        ctx.save_for_backward(*tensors)
        ctx.meta, ctx.tensors, ctx.float_type = meta, kept, tensors[0].dtype
        ctx.shapes = [t.shape for t in tensors]
        return results

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 (raises if one was modified in place since forward)
        return (None, *backward(ctx.meta, ctx.tensors, ctx.shapes, grads))


def backward(meta, kept, shapes, grads):
    """The gradients of the loop's tensors (of `shapes`, laid out as `kept`: _laid_out's and
    the saved states) from its results' (`grads`, None for one not used)."""
    kern, T, N, n_seq, n_const, out_shapes = meta
    seq, consts, states, saved = kept
    dtype = seq[0].dtype if seq else states[0].dtype
    n_out = len(out_shapes)
    gouts = [None if g is None else rows(g, 2) for g in grads[:n_out]]
    gfinals = [None if g is None else rows(g, 1).contiguous() for g in grads[n_out:]]
    gseq = [torch.empty(T, N, x.shape[2], dtype=dtype) for x in seq]
    gconst = [torch.zeros(N, c.numel(), dtype=dtype) for c in consts]
    ginit = [torch.empty_like(s) for s in states]
    sizes = [N, T, torch.get_num_threads(), 1]
    for x in seq:
        sizes += [x.stride(1), x.stride(0)]  # [N, T, ...] read as [T, N, ...]
    for g in gouts:
        sizes += [0, 0] if g is None else [g.stride(1), g.stride(0)]  # [N, T, ...]
    kern("backward", dtype, sizes, [*seq, *consts, *states, *saved, *gouts, *gfinals,
                                    *gseq, *gconst, *ginit])
    grads_in = [g.transpose(0, 1).reshape(s) for g, s in zip(gseq, shapes[:n_seq])]
    grads_in += [g.sum(0).view(s) for g, s in zip(gconst, shapes[n_seq:n_seq + n_const])]
    grads_in += [g.view(s) for g, s in zip(ginit, shapes[n_seq + n_const:])]
    return grads_in


# ---- cells over graphs: the levels of a schedule in one kernel (backends/cpp/graph.py) ----------
class GraphIndex:
    """A Schedule as the graph kernel reads it: int64 arrays, in backends/cpp/graph.py's
    GRAPH_ARRAYS order. Nodes in level order (`order`, a level's nodes from level_ptr[L]); each
    node's incoming edges (CSR `in_ptr`, in edge_index order, or one virtual edge from the
    initial state: store row `nodes`, edge id edges + node) with the node each comes from, the
    edge's id and slot; its outgoing edges (`out_ptr`, `out_edge`, `out_slot`); and pred(E, k)'s
    k-th incoming edge of each node (`pred_src`, `pred_edge` [slots, nodes], the virtual one
    where none)."""

    def __init__(self, schedule):
        nodes, edges = schedule.n_nodes, schedule.n_edges
        levels = schedule.levels
        sizes = torch.tensor([lv.n_nodes for lv in levels], dtype=torch.long)
        order = torch.cat([lv.seq_node.cpu() for lv in levels])
        tgt = torch.cat([lv.seq_node.cpu()[lv.node_in.cpu()] for lv in levels])
        src = torch.cat([lv.in_src.cpu() for lv in levels])
        edge = torch.cat([lv.in_edge.cpu() for lv in levels])
        in_slot = torch.cat([lv.in_slot.cpu() for lv in levels])
        edge = torch.where(edge == edges, edges + tgt, edge)
        by_target = torch.sort(tgt, stable=True).indices
        out_src = torch.cat([lv.seq_node.cpu()[lv.node_out.cpu()] for lv in levels])
        out_edge = torch.cat([lv.out_edge.cpu() for lv in levels])
        out_slot = torch.cat([lv.out_slot.cpu() for lv in levels])
        by_source = torch.sort(out_src, stable=True).indices
        slots = len(levels[0].pred_src)
        pred_src = torch.full((max(slots, 1), nodes), nodes, dtype=torch.long)
        pred_edge = (edges + torch.arange(nodes)).repeat(max(slots, 1), 1)
        for lv in levels:
            at = lv.seq_node.cpu()
            for k in range(slots):
                pred_src[k, at] = lv.pred_src[k].cpu()
                pred_edge[k, at] = torch.where(lv.pred_edge[k].cpu() == edges, edges + at,
                                               lv.pred_edge[k].cpu())
        self.nodes, self.edges, self.levels = nodes, edges, len(levels)
        self.arrays = [_starts(sizes), order, _starts(torch.bincount(tgt, minlength=nodes)),
                       src[by_target], edge[by_target], in_slot[by_target],
                       _starts(torch.bincount(out_src, minlength=nodes)), out_edge[by_source],
                       out_slot[by_source], pred_src, pred_edge]
        self.arrays = [a.contiguous() for a in self.arrays]


def _starts(counts):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])


def graph_index(schedule) -> GraphIndex:
    """The schedule's GraphIndex, built once (schedules are cached per graph)."""
    found = getattr(schedule, "cpp_index", None)
    if found is None:
        found = schedule.cpp_index = GraphIndex(schedule)
    return found


def graph(kern: Kernel, run, seq, consts, states, out_shapes, on_edges, built_for):
    """Run a cell over the levels of `run` (rcc.runtime.graph.GraphRun: its schedule and nb, the
    rows of a node). seq: per-node values [nodes * nb, ...]; states: initial states [nb, *decl],
    `on_edges` saying which live on edges. Returns (outputs [nodes * nb, *shape], every node's
    (edge's) state [nodes (edges), nb, *decl]), differentiable by every tensor."""
    tensors = (*seq, *consts, *states)
    check_built_for("backend 'cpp'", run.schedule.n_nodes * run.nb, run.nb, tensors, built_for)
    meta = (kern, graph_index(run.schedule), run.nb, len(seq), len(consts), out_shapes,
            tuple(on_edges))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        results = _Levels.apply(meta, *tensors)
    else:
        results = _levels_forward(meta, tensors)[0]
    return _split(results, len(out_shapes))


def _levels_forward(meta, tensors):
    kern, index, nb, n_seq, n_const, out_shapes, on_edges = meta
    dtype = _one_dtype(tensors)
    nodes = index.nodes
    seq = [rows(x, 1).contiguous() for x in tensors[:n_seq]]
    consts = [c.contiguous() for c in tensors[n_seq:n_seq + n_const]]
    given = tensors[n_seq + n_const:]
    stores, rows_of = [], []
    for s, edges in zip(given, on_edges):
        # a row per node (edge), then what nodes without predecessors read: the initial state
        n = index.edges if edges else nodes
        store = torch.empty(n + (nodes if edges else 1), nb, math.prod(s.shape[1:]), dtype=dtype)
        store[n:] = s.reshape(nb, -1)
        stores.append(store)
        rows_of.append(n)
    outs = [torch.empty(nodes * nb, *shape, dtype=dtype) for shape in out_shapes]
    sizes = [nb, nodes, index.edges, torch.get_num_threads(), index.levels]
    kern("forward", dtype, sizes, [*seq, *consts, *stores, *outs, *index.arrays])
    finals = [st[:n].view(n, *s.shape) for st, s, n in zip(stores, given, rows_of)]
    return (*outs, *finals), (seq, consts, stores)


class _Levels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, *tensors):
        meta[0].start_backward(_one_dtype(tensors))  # built while this forward runs
        results, kept = _levels_forward(meta, tensors)
        ctx.save_for_backward(*tensors)  # for autograd's in-place check (see _Loop)
        ctx.meta, ctx.kept, ctx.float_type = meta, kept, tensors[0].dtype
        ctx.shapes = [t.shape for t in tensors]
        n_out = len(meta[5])
        # the stores are what backward reads: hand out copies of the final states
        return (*results[:n_out], *[f.clone() for f in results[n_out:]])

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, never a silent 0
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 (raises if one was modified in place since forward)
        kern, index, nb, n_seq, n_const, out_shapes, _ = ctx.meta
        seq, consts, stores = ctx.kept
        dtype, nodes = ctx.float_type, index.nodes
        n_out = len(out_shapes)
        threads = torch.get_num_threads()
        gouts = [None if g is None else g.contiguous() for g in grads[:n_out]]
        gfinals = [None if g is None else g.reshape(g.shape[0], nb, -1).contiguous()
                   for g in grads[n_out:]]
        gseq = [torch.zeros_like(x) for x in seq]
        gconst = [torch.zeros(threads, c.numel(), dtype=dtype) for c in consts]
        gedge = [torch.zeros(index.edges + nodes, nb, st.shape[2], dtype=dtype) for st in stores]
        sizes = [nb, nodes, index.edges, threads, index.levels]
        kern("backward", dtype, sizes, [*seq, *consts, *stores, *gouts, *gfinals, *gseq, *gconst,
                                        *gedge, *index.arrays])
        grads_in = [g.view(s) for g, s in zip(gseq, ctx.shapes[:n_seq])]
        grads_in += [g.sum(0).view(s) for g, s in zip(gconst, ctx.shapes[n_seq:n_seq + n_const])]
        # what nodes without predecessors (or without a k-th edge) read: the initial state
        grads_in += [g[index.edges:].sum(0).view(s)
                     for g, s in zip(gedge, ctx.shapes[n_seq + n_const:])]
        return (None, *grads_in)
