"""Many clients at LLaVA-1.5-7B's shapes on one machine: the server's round with client states
and messages in files (tools/store.py, the in-process engine's path) against today's
in-memory path, at K clients, each K in a fresh process.

Synthetic client states with LLaVA-1.5-7B's exact shapes: LoRA r = 64 on q, k, v, o, gate, up,
down of Vicuna-7B's 32 layers (160M parameters), and the connector: stage 1 psi_t + psi_s
(Linear(1024, 4096) -> GELU -> Linear(4096, 4096) each, 42M), stage 2 the CT-MoA of 3 tasks (h_0,
2 frozen experts, 2 cross-task adapters, the router) + psi_s (126M); fp32, as the run keeps
them. What is timed is the server's round: the K uploads (LoRA + task adapter) read, the
K x K distances, ATA, the task averages, the K personalised downloads written, and the round's
checkpoint (client states + server state). The files are written beforehand by another
process, so the measured one starts with nothing in memory.

    python benchmarks/bench_clients.py                       # K = 9, 18, 27 streamed; K = 9 in memory; stage 1
    python benchmarks/bench_clients.py --clients 9 --stage 2 --modes streamed memory
    python benchmarks/bench_clients.py --smoke               # tiny shapes, for the test suite

Needs free disk of about K x 2.2 GB (stage 1: a client's state 0.81 GB, its upload 0.72 GB, its
download 0.64 GB), checked before starting. Prints one JSON line.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, emit, parser

LAYERS, C, C_MLP, C_V, R, TASKS = 32, 4096, 11008, 1024, 64, 3
TARGETS = {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "o_proj": (C, C),
           "gate_proj": (C, C_MLP), "up_proj": (C, C_MLP), "down_proj": (C_MLP, C)}   # (in, out)


def shapes(smoke: bool, stage: int) -> tuple[dict, dict]:
    """(LoRA shapes, connector shapes) of one client state, by client-state name."""
    layers, c, c_mlp, c_v, r = (2, 64, 128, 32, 4) if smoke else (LAYERS, C, C_MLP, C_V, R)
    dims = {n: ({C: c, C_MLP: c_mlp}[i], {C: c, C_MLP: c_mlp}[o]) for n, (i, o) in TARGETS.items()}
    lora = {}
    for layer in range(layers):
        for name, (i, o) in dims.items():
            part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            lora[f"lm.model.layers.{layer}.{part}.{name}.lora_A"] = (r, i)
            lora[f"lm.model.layers.{layer}.{part}.{name}.lora_B"] = (o, r)
    adapter = {"linear_1.weight": (c, c_v), "linear_1.bias": (c,), "linear_2.weight": (c, c), "linear_2.bias": (c,)}
    prefixes = ["connector.psi_t.", "connector.psi_s."] if stage == 1 else (
        ["connector.moa.psi_t.", "connector.psi_s."] + [f"connector.moa.psi_t_other.{i}." for i in range(TASKS - 1)]
        + [f"connector.moa.psi_c.{i}." for i in range(TASKS - 1)])
    conn = {p + k: s for p in prefixes for k, s in adapter.items()}
    if stage == 2:
        conn["connector.moa.router.weight"] = (TASKS, c_v)
        conn["connector.gate"] = ()
    return lora, conn


def own_prefix(stage: int) -> str:
    return "connector.psi_t." if stage == 1 else "connector.moa.psi_t."


def prepare(folder: str, K: int, stage: int, smoke: bool) -> None:
    """Every client's state and upload file, random values (a generator per client)."""
    import torch

    from tools import store
    lora, conn = shapes(smoke, stage)
    cs = store.ClientStore(os.path.join(folder, "states"), [f"c{k}" for k in range(K)])
    for k in range(K):
        g = torch.Generator().manual_seed(k)
        state = {n: torch.randn(s, generator=g) * 0.01 for n, s in {**lora, **conn}.items()}
        cs.save(k, state)
        prefix = own_prefix(stage)
        cs.message_file(f"up_{k}.lora", {n: state[n] for n in lora})
        cs.message_file(f"up_{k}.task_adapter", {n[len(prefix):]: state[n] for n in conn if n.startswith(prefix)})
        del state


def io_bytes() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def server_round(folder: str, K: int, stage: int, mode: str) -> dict:
    """The measured process: one server round, streamed or in memory."""
    import torch

    import fed
    from tools import store
    torch.set_num_threads(1)
    names = [f"c{k}" for k in range(K)]
    tasks = [f"t{k % TASKS}" for k in range(K)]
    cs = store.ClientStore(os.path.join(folder, "states"), names)
    ups = {k: {g: store.StateFile(os.path.join(cs.messages, f"up_{k}.{g}.safetensors")) for g in ("lora", "task_adapter")}
           for k in range(K)}
    read = sum(f.nbytes for up in ups.values() for f in up.values())
    io0, t0 = io_bytes(), time.perf_counter()
    server = fed.Server("pilot", tasks, [100 + k for k in range(K)], None)
    if mode == "memory":        # today's engine: every upload in memory, K downloads built in memory
        ups = {k: {g: dict(f.load()) for g, f in up.items()} for k, up in ups.items()}
    else:
        server.store = cs
    agg = server.aggregate(ups, all_tasks=True)
    ckpt = os.path.join(folder, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    if mode == "memory":        # today's checkpoint: the K states (held in memory) each saved
        states = [cs.load(k) for k in range(K)]
        for k, s in enumerate(states):
            store.save_state(os.path.join(ckpt, f"client_{names[k]}.safetensors"), s)
    else:                       # the store's files, linked
        for k in range(K):
            store.link_or_copy(cs.path(k), os.path.join(ckpt, f"client_{names[k]}.safetensors"))
    store.save_state(os.path.join(ckpt, "server.safetensors"), server.state())
    seconds = time.perf_counter() - t0
    io1 = io_bytes()
    written = sum(os.path.getsize(os.path.join(cs.messages, f)) for f in os.listdir(cs.messages) if f.startswith("down_"))
    if mode == "memory":
        written += sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    else:
        written += os.path.getsize(os.path.join(ckpt, "server.safetensors"))
    assert len(agg.downloads) == K and all("lora" in agg.downloads[k] for k in range(K))
    return {"K": K, "stage": stage, "mode": mode, "seconds": round(seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "bytes_read_gb": round(read / 1e9, 3), "bytes_written_gb": round(written / 1e9, 3),
            "disk_write_bytes_gb": round((io1["write_bytes"] - io0["write_bytes"]) / 1e9, 3)}


def one(K: int, stage: int, mode: str, smoke: bool, where: str) -> dict:
    folder = tempfile.mkdtemp(prefix=f"bench-clients-{K}-", dir=where)
    try:
        subprocess.run([sys.executable, __file__, "--prepare", folder, str(K), str(stage)] + (["--smoke"] if smoke else []),
                       check=True, cwd=ROOT)
        out = subprocess.run([sys.executable, __file__, "--measure", folder, str(K), str(stage), mode], check=True,
                             cwd=ROOT, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = parser(__doc__)
    ap.add_argument("--clients", nargs="+", type=int, default=[9, 18, 27])
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2))
    ap.add_argument("--modes", nargs="+", default=["streamed", "memory"], choices=("streamed", "memory"))
    ap.add_argument("--memory-up-to", type=int, default=9, help="run the in-memory path only up to this K")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (needs the disk said above)")
    ap.add_argument("--prepare", nargs=3, help=argparse_hidden())
    ap.add_argument("--measure", nargs=4, help=argparse_hidden())
    args = ap.parse_args()
    if args.prepare:
        folder, K, stage = args.prepare
        return prepare(folder, int(K), int(stage), args.smoke)
    if args.measure:
        folder, K, stage, mode = args.measure
        return print(json.dumps(server_round(folder, int(K), int(stage), mode)))
    clients = [3] if args.smoke else args.clients
    lora, conn = shapes(args.smoke, args.stage)
    n_lora, n_conn = sum(_numel(s) for s in lora.values()), sum(_numel(s) for s in conn.values())
    n_own = sum(_numel(s) for n, s in conn.items() if n.startswith(own_prefix(args.stage)))
    state = 4 * (n_lora + n_conn)
    per_client = state + 4 * (n_lora + n_own) + 4 * n_lora       # its state, its upload, its download
    need = max(clients) * per_client * 1.05 + ("memory" in args.modes) * args.memory_up_to * state   # + copies
    free = shutil.disk_usage(args.dir).free
    print(f"bench_clients: K up to {max(clients)} needs ~{need / 1e9:.1f} GB of disk in {args.dir}; "
          f"{free / 1e9:.1f} GB free", file=sys.stderr)
    if need > free:
        raise SystemExit(f"not enough free disk in {args.dir}: ~{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    rows = []
    for K in clients:
        for mode in args.modes:
            if mode == "memory" and K > args.memory_up_to:
                continue
            rows.append(one(K, args.stage, mode, args.smoke, args.dir))
            print(json.dumps(rows[-1]), file=sys.stderr)
    emit("clients", stage=args.stage, client_state_gb=round(state / 1e9, 3), rows=rows)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
