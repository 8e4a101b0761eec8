"""Diagonal-plus-rank-one steps read off a matrix state's update, for plan chunk's "dplr" form.

Each link of the update's dominator chain (rcc.plans._chain) is read as one micro-step
    S <- diag(exp(g)) S + a (b^T S) + k u^T
from the IR: the read is the one `b @ S` the link contains, a = kappa * c * x where the read
enters `kappa * outer(x, w)` with w affine in it (dw / d(b @ S) = c, a scalar), the decay is the
link's derivative along the state with the read held fixed, and the write is what the link gives
at S = 0. A gate link followed by a link without its own decay is merged into one micro-step: the
read of the decayed state is b^T diag(e^g) S, so b becomes b * e^g. What is read here is only a
candidate: rcc.passes.verify checks that the micro-steps reproduce the step exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from .passes.linearize import ZERO


class NotLowRank(Exception):
    """Why a link is not diagonal plus rank one."""


@dataclass(frozen=True)
class Micro:
    """One micro-step (node ids): log_decay [K] (or None: no decay), a, b [K] (None: no read),
    k [K], u [V] (None: no write)."""
    log_decay: object = None
    a: object = None
    b: object = None
    k: object = None
    u: object = None

    @property
    def gate_only(self):
        return self.a is None and self.k is None


def micro_steps(cell, lin, chain, decl, helpers):
    """The micro-steps of the chain's links, merged where a gate precedes a link (helpers:
    log_of, drop_axis, rank_one from rcc.plans)."""
    steps = [_link(cell, lin, p, n, decl, helpers) for p, n in zip(chain, chain[1:])]
    merged = []
    for m in steps:
        last = merged[-1] if merged else None
        if last is not None and last.gate_only and m.log_decay is None:
            b = None if m.b is None else lin._bin("mul", m.b, lin._un("exp", last.log_decay))
            merged[-1] = Micro(last.log_decay, m.a, b, m.k, m.u)
        elif last is not None and last.gate_only and m.gate_only:
            merged[-1] = Micro(lin._bin("add", last.log_decay, m.log_decay))
        elif last is not None and last.k is None and m.log_decay is None and m.a is None:
            merged[-1] = Micro(last.log_decay, last.a, last.b, m.k, m.u)  # a write after it
        else:
            merged.append(m)
    return merged


def filled(lin, steps, K, V, span):
    """The micro-steps with every piece a node of one shape (zeros where absent; per-key decays),
    as the runtime's stacked arguments need."""
    def full(v, size):
        if v is None:
            return lin.b.emit("zeros", (), (size,), span)
        if tuple(lin.node(v).type.shape) == (size,):
            return v
        return lin._bin("mul", v, lin.b.emit("ones", (), (size,), span))
    # one decay for every key (a scalar gate in every micro-step) stays one value: the runtime's
    # decayed products are then a matmul times [L, L] decays
    width = 1 if all(m.log_decay is None or lin.node(m.log_decay).type.rank == 0
                     for m in steps) else K
    return [Micro(full(m.log_decay, width), full(m.a, K), full(m.b, K), full(m.k, K),
                  full(m.u, V)) for m in steps]


def _link(cell, lin, p, n, decl, helpers):
    log_of, drop_axis, rank_one = helpers
    reads = [i for i in lin.cone([n]) if cell.node(i).op == "matmul"
             and cell.node(i).args[1] == p and cell.node(i).type.rank == 1]
    if len(reads) > 1:
        raise NotLowRank(f"a step reads state '{decl.name}' through {len(reads)} keys (the "
                         "chunkwise forms take one rank-one read per step)")
    z = reads[0] if reads else None
    held = {z: None} if z is not None else {}
    decay = lin.tangent({p: lin.one, **held}, [n])[n]
    if decay is None:
        raise NotLowRank(f"a step of state '{decl.name}' does not keep a multiple of it (no decay "
                         "term d * S)")
    shape = tuple(lin.node(decay).type.shape)
    if len(shape) >= 1 and shape[-1] != 1:
        raise NotLowRank(f"the decay of state '{decl.name}' varies along its last axis (it must "
                         "scale whole rows: decay[..., :, None] or a scalar)")
    log_decay = None
    if decay != lin.one:
        log_decay = log_of(lin, decay)
        if len(shape) >= 1:
            log_decay = drop_axis(lin, log_decay, len(shape) - 1)
    a = b = None
    if z is not None:
        a, b = _rank_one_read(cell, lin, p, n, z, decl), cell.node(z).args[0]
    write = lin.substitute({p: ZERO}, [n])[n]
    k = u = None
    if write != ZERO:
        k, u = rank_one(cell, lin, write, decl)
    return Micro(log_decay, a, b, k, u)


def _rank_one_read(cell, lin, p, n, z, decl):
    """a for the term a (b^T S) where the read z = b @ S enters kappa * outer(x, w(z))."""
    outers = [i for i in lin.cone([n]) if cell.node(i).op == "outer"
              and z in lin.cone([cell.node(i).args[1]])]
    if len(outers) != 1:
        raise NotLowRank(f"the read of state '{decl.name}' does not enter one outer product "
                         "outer(x, w) with w affine in it")
    x, w = cell.node(outers[0]).args
    c = lin.tangent({z: lin.one, p: None}, [w])[w]
    kappa = lin.tangent({outers[0]: lin.one, p: None, z: None}, [n])[n]
    if c is None or kappa is None or lin.node(c).type.rank or lin.node(kappa).type.rank or \
            lin.depends_on(c, [p, z]) or lin.depends_on(kappa, [p, z]) or lin.depends_on(x, [p]):
        raise NotLowRank(f"the read of state '{decl.name}' enters its update other than as "
                         "scalar * outer(x, u + scalar * (b @ S))")
    return lin._bin("mul", lin._bin("mul", kappa, c), x)
