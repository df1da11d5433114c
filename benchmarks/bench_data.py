"""LLaVA JSON at dataset scale: load-and-check time, time to the first training step, peak RSS,
and pictures per second through the DataLoader, at 1k, 10k and 40k records of 336 x 336 JPEGs
(9 clients, written to a temp folder by common.write_jpeg_manifest, the tests' generator).
Each size runs in a fresh process, so its peak RSS is its own.

    python benchmarks/bench_data.py              # 1k, 10k, 40k records (~3 min on 2 cores)
    python benchmarks/bench_data.py --smoke      # 200 records

Goals (issue: the real run at real size): RSS grows by < 150 MB from 1k to 40k records, load
and check take < 30 s per 10k records on 2 cores, the loader keeps a 7B step fed: >= 16
pictures/s with 2 workers. Pictures/s is measured with LLaVA-1.5's CLIP-336 preprocessing
(resize, centre crop, normalise to 336 x 336), the work a 7B run's loader does.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, emit, parser, peak_rss_mb, write_jpeg_manifest


def loader_rate(enc, samples, n: int, workers: int) -> float:
    """Pictures per second through data.batch_loader (batches of 16) with LLaVA-1.5's CLIP-336
    preprocessing, over the first n samples."""
    import copy

    from transformers import CLIPImageProcessorPil

    import data
    enc = copy.copy(enc)
    enc.image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    n = min(n, len(samples))
    plan = [list(range(i, min(i + 16, n))) for i in range(0, n, 16)]
    t = time.perf_counter()
    for _ in data.batch_loader(enc, samples, plan, num_workers=workers):
        pass
    return n / (time.perf_counter() - t)


def one(manifest: str, smoke: bool) -> dict:
    """Load and check, build, first step, then the loader's pictures/s at 0 and 2 workers."""
    import torch

    import fed
    import model as model_mod
    import train
    from tools import runs
    over = [f"model.cache_dir={ROOT}/.cache", "data.scenario=manifest", f"data.manifest={manifest}",
            "fed.local_epochs=1"] + (["model.embedded_pretrain_steps=5"] if smoke else [])
    cfg = train.load_config(f"{ROOT}/config.yaml", over)
    t0 = time.perf_counter()
    clients = train.load_data(cfg)
    load_s = time.perf_counter() - t0
    identity_t = time.perf_counter()
    runs.run_identity(cfg, clients)
    identity_s = time.perf_counter() - identity_t
    rss_loaded = peak_rss_mb()
    fedn = train.build(cfg, clients)

    class FirstStep:   # a progress object: the time of the first optimiser step
        at = None

        def update(self, n):
            FirstStep.at = FirstStep.at or time.perf_counter()

        def set_postfix_str(self, *a, **k):
            pass
    node = fedn.engine.nodes[0]
    node.structure(1)
    model_mod.load_client_state(fedn.engine.shared.model, fedn.engine.states[0])
    few = clients[0].train[:cfg.fed.batch_size]
    fed.local_train(fedn.engine.shared.model, fedn.engine.shared.enc, few, fed.LocalSettings(cfg.fed, 1e-3, node.loss_weights(1)),
                    torch.Generator().manual_seed(0), progress=FirstStep())
    first_step_s = FirstStep.at - t0
    rate = {w: loader_rate(fedn.engine.shared.enc, clients[0].train, 64 if smoke else 512, w) for w in (0, 2)}
    records = sum(len(c.train) + len(c.val) + len(c.test) for c in clients)
    return {"records": records, "load_and_check_s": round(load_s, 2), "identity_s": round(identity_s, 3),
            "first_step_s": round(first_step_s, 2), "peak_rss_after_load_mb": round(rss_loaded, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "pictures_per_s_0_workers": round(rate[0], 1),
            "pictures_per_s_2_workers": round(rate[2], 1)}


def main():
    ap = parser(__doc__)
    ap.add_argument("--one", metavar="MANIFEST", help="internal: measure one manifest, print one JSON line")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.smoke)))
        return
    sizes = [200] if args.smoke else [1000, 10000, 40000]
    rows = []
    for n in sizes:
        folder = tempfile.mkdtemp(prefix=f"bench-data-{n}-")
        try:
            t = time.perf_counter()
            manifest = write_jpeg_manifest(folder, n, clients=9, side=336)
            write_s = time.perf_counter() - t
            out = subprocess.run([sys.executable, __file__, "--one", manifest] + (["--smoke"] if args.smoke else []),
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"write_s": round(write_s, 1)})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    growth = rows[-1]["peak_rss_after_load_mb"] - rows[0]["peak_rss_after_load_mb"]
    emit("data", rows=rows, rss_growth_mb=round(growth, 1),
         load_s_per_10k=round(max(r["load_and_check_s"] * 10000 / r["records"] for r in rows), 2))


if __name__ == "__main__":
    main()
