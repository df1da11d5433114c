"""Memory of the in-process federation: peak RSS with K = 1, 3, 9, 27 clients on one shared
model (the embedded base, built on first use). Each K runs in a fresh process. The extra per
client should be about that client's state (connector + LoRA) plus its data.

    python benchmarks/bench_memory.py
"""

import json
import subprocess
import sys

from common import ROOT, emit, parser, peak_rss_mb, rss_mb


def one(K: int, device: str, smoke: bool) -> dict:
    import train
    steps = ["model.embedded_pretrain_steps=5"] if smoke else []   # smoke: a 5-step base, built in seconds
    cfg = train.load_config(f"{ROOT}/config.yaml", steps + [f"data.clients_per_task={max(1, K // 3)}", "data.train_per_client=4",
                                                     "data.test_per_client=1", "fed.local_epochs=1",
                                                     f"model.device={device}", f"model.cache_dir={ROOT}/.cache"])
    clients = train.load_data(cfg)
    f = train.build(cfg, clients=clients[:1] if K == 1 else clients)
    after_build = rss_mb()
    f.run_round(1)
    state_mb = sum(v.numel() * v.element_size() for v in f.engine.states[0].values()) / 2 ** 20
    return {"K": K, "rss_after_build_mb": round(after_build, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "client_state_mb": round(state_mb, 3)}


def main():
    ap = parser(__doc__)
    ap.add_argument("--one", type=int, help="internal: run one K and print it")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.smoke)))
        return
    import train
    from tools import embedded
    steps = ["model.embedded_pretrain_steps=5"] if args.smoke else []
    embedded.embedded_checkpoint(train.load_config(f"{ROOT}/config.yaml", steps + [f"model.cache_dir={ROOT}/.cache"]).model)
    rows = []   # the base is built above, so no child process pays for (or measures) building it
    for K in ((1, 3) if args.smoke else (1, 3, 9, 27)):
        out = subprocess.run([sys.executable, __file__, "--one", str(K), "--device", args.device]
                             + (["--smoke"] if args.smoke else []),
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    per_client = (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) / (rows[-1]["K"] - rows[0]["K"])
    emit("federation_memory", device=args.device, rows=rows, extra_peak_mb_per_client=round(per_client, 3))


if __name__ == "__main__":
    main()
