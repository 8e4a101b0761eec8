"""What the benchmark scripts share: the machine's description and a timer."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, device, warmup, repeats) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def print_machine(gpu=None):
    """The line each table is recorded with: CPU, threads, torch, rcc, Python (and `gpu`'s name)."""
    import rcc

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; rcc {rcc.__version__}; Python {platform.python_version()}")
    if gpu is not None:
        print(f"GPU: {torch.cuda.get_device_name(gpu)}")
