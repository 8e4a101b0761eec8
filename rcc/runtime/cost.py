"""The cost model behind plan 'auto': an estimate of each legal plan's time for a call's device,
sequence length and state size, from counts of the operations each plan runs.

Summary of the model: a plan costs (torch operations issued) x (per-operation overhead) +
(elements touched) / (elementwise throughput). The sequential loop issues the step's operations
T times on N x state elements; the scan issues a fixed set over T x N x state elements plus
2 log2 T passes of the scan; Newton repeats the step, its Jacobian and a scan for a few
iterations; the chunkwise form runs a loop of T / C chunks, each with C-wide matmuls. The
constants are rough per-device figures (benchmarks/plans.py measures the real ratios); only the
ratios between plans matter for the choice.
"""
from __future__ import annotations

import math

DEVICES = {  # per-op overhead (s), elementwise throughput (elements/s), matmul rate (flop/s)
    "cpu": (8e-6, 1.5e9, 3e10),
    "cuda": (8e-6, 3e11, 3e13),
}
NEWTON_ITERATIONS = 4  # typical for the contractive cells it is legal for (BENCHMARKS.md)


def device_kind(device) -> str:
    """'cpu' or 'cuda' for a device the cost model knows ('cpu', 'cuda', 'cuda:1', a
    torch.device); anything else is a ValueError."""
    text = str(device)
    if text == "cpu" or text == "cuda" or text.startswith("cuda:"):
        return text.split(":")[0]
    raise ValueError(f"device {device!r}: plan 'auto' chooses for 'cpu' or 'cuda' (or 'cuda:N')")


def estimate(plan: str, facts: dict, device: str, T: int, N: int) -> float:
    """Seconds, roughly, for one forward call. `facts`: step_ops (operations of one step),
    plan_ops (operations the plan adds per call), state (elements of the states per sequence),
    key/value (sizes of a matrix state, for the chunkwise form), block (Newton's k)."""
    overhead, rate, flops = DEVICES[device_kind(device)]
    state = facts["state"] * N
    depth = 2 * max(1.0, math.log2(T))
    if plan == "sequential":
        return T * facts["step_ops"] * overhead + T * facts["step_ops"] * state / rate
    if plan == "scan":
        return (facts["plan_ops"] + 2 * depth) * overhead + T * state * (facts["step_ops"] + 6) / rate
    if plan == "newton":
        k = facts.get("block", 1)
        ops = facts["plan_ops"] + 2 * depth
        work = T * state * (facts["plan_ops"] + 6 * k)
        return NEWTON_ITERATIONS * (ops * overhead + work / rate)
    if plan == "chunk":
        C = facts.get("chunk_size", 64)
        K, V = facts["key"], facts["value"]
        heads = max(1, facts["state"] // max(1, K * V))
        chunks = math.ceil(T / C)
        matmul = 2 * T * N * heads * (C * (K + V) + 2 * K * V)
        return (facts["plan_ops"] + 6 * chunks) * overhead + matmul / flops + T * state / C / rate
    raise ValueError(f"no cost estimate for plan {plan!r}")


def choose(plans, facts: dict, device: str, T: int, N: int):
    """(the cheapest plan, {plan: estimated seconds})."""
    table = {p: estimate(p, facts[p], device, T, N) for p in plans}
    return min(table, key=table.get), table
