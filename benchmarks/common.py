"""Shared helpers of the benchmarks: argument parsing, timing, memory, one JSON line out."""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on cuda)")
    ap.add_argument("--smoke", action="store_true", help="smallest setting, for the test suite")
    return ap


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls, in seconds (the minimum is the least noisy)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(name: str, **figures) -> None:
    """Print the benchmark's one JSON line."""
    print(json.dumps({"benchmark": name, "torch": torch.__version__, "threads": torch.get_num_threads(), **figures}))
