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


def write_jpeg_manifest(out_dir: str, records: int, clients: int = 9, side: int = 336, seed: int = 0,
                        test_fraction: float = 0.1) -> str:
    """A LLaVA-JSON manifest of `records` records over `clients` clients (scenario A's tasks and
    styles), each record with its own side x side JPEG, written one picture at a time (nothing
    is held in memory). The data of bench_data.py and of tests/test_stream.py. Returns the
    manifest's path."""
    import random

    import yaml

    from tools import embedded
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    tasks = embedded.SCENARIOS["A"]
    manifest = []
    for c in range(clients):
        task, name = tasks[c % len(tasks)], f"{tasks[c % len(tasks)]}{c // len(tasks)}"
        rng = random.Random(f"bench-{seed}-{name}")
        style = embedded.client_style(rng, task, c // len(tasks))
        n = records // clients + (c < records % clients)
        recs = []
        for j in range(n):
            s = embedded.synthetic_sample(rng, task, style, side, f"{name}-{j}")
            s.image.save(os.path.join(out_dir, "images", f"{s.id}.jpg"), quality=85)
            conv = [{"from": "human", "value": s.turns[0][0]}, {"from": "gpt", "value": s.turns[0][1]}]
            recs.append({"id": s.id, "image": f"{s.id}.jpg", "conversations": conv})
        n_test = max(1, int(round(test_fraction * n)))
        for split, part in (("train", recs[:-n_test]), ("test", recs[-n_test:])):
            with open(os.path.join(out_dir, f"{name}_{split}.json"), "w") as f:
                json.dump(part, f)
        manifest.append({"name": name, "task": task, "train": f"{name}_train.json", "test": f"{name}_test.json",
                         "image_folder": "images"})
    path = os.path.join(out_dir, "manifest.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=False)
    return path
