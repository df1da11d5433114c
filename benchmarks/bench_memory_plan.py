"""The memory plan of `train.py --dry-run` (tools/sizing.size_report) checked against a measurement:
the peak RSS that one CPU training step of Pilot's stage 1 adds, at three LLaMA-shaped sizes
that fit this machine (about 0.1B, 0.5B and 1.3B parameters, random weights built from
configs, a small CLIP in front), in float32 and bfloat16. Each (size, dtype) runs in a fresh
process: RSS before the model is built is subtracted. Prints estimate / measured per row.

    python benchmarks/bench_memory_plan.py           # ~15 min on 2 cores (bf16 is slow on CPU), ~12 GB peak
    python benchmarks/bench_memory_plan.py --smoke   # one tiny size

The step is the local step of fed.local_train: the PilotLlava forward with the stage-1
connector and LoRA on every decoder linear, the loss, backward, gradient clipping and an AdamW
step over the trainable parameters (the AdamW state exists from then on).
"""

import json
import os
import subprocess
import sys
import tempfile

from common import emit, parser, peak_rss_mb, rss_mb

SIZES = {   # hidden, layers, MLP, heads (LLaMA shape, vocab 32000)
    "0.1B": (768, 12, 2048, 12),
    "0.5B": (1536, 16, 4096, 12),
    "1.3B": (2048, 24, 5504, 16),
    "smoke": (128, 2, 256, 4),
}
SEQ, BATCH = 256, 1   # bf16 on a CPU without AVX-512 runs ~4 GFLOP/s: 256 tokens keep 1.3B near 8 min


def llava_config(size: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    hidden, layers, mlp, heads = SIZES[size]
    vc = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                          image_size=224, patch_size=16, projection_dim=256)
    tc = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                     tie_word_embeddings=False)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_id=31999, image_seq_length=196)


def random_batch(n_img: int, image_token_id: int, g) -> dict:
    """BATCH x SEQ random tokens, the image after the first, labels on the text after it."""
    import torch
    ids = torch.randint(0, 31000, (BATCH, SEQ), generator=g)
    ids[:, 1:1 + n_img] = image_token_id
    labels = ids.clone()
    labels[:, :1 + n_img] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                pixel_values=torch.randn(BATCH, 3, 224, 224, generator=g))


def one(size: str, dtype: str) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    import fed
    import model as model_mod
    from tools import sizing
    torch.manual_seed(0)
    config = llava_config(size)
    with tempfile.TemporaryDirectory() as tmp:   # size_report reads a checkpoint's config.json
        config.save_pretrained(tmp)
        cfg = model_mod.ModelConfig(llava=tmp, dtype=dtype, lora_r=64, lora_alpha=128.0)
        report = sizing.size_report(cfg, model_mod.loader(cfg), "pilot", 3, BATCH, SEQ)
    estimate = report["stages"]["pilot stage 1"]["memory_bytes"]
    before = rss_mb()
    # built in its dtype from the start: a float32 build converted afterwards would put a
    # transient float32 copy into the peak
    llava = LlavaForConditionalGeneration._from_config(config, dtype=model_mod.DTYPES[dtype])
    base = model_mod.base_from_llava(llava, None, None, size)
    del llava
    g = torch.Generator().manual_seed(0)
    connector = model_mod.build_connector("stage1", base, False, g)
    pilot_model = model_mod.build_model(base, connector, cfg, g)
    batch = random_batch(base.n_image_tokens, config.image_token_id, g)
    fcfg = fed.FedConfig()
    opt, params = fed.make_optimizer(pilot_model, fcfg, 1e-4)
    pilot_model.train()
    with model_mod.autocast(pilot_model):
        out = pilot_model(**batch)
        loss = fed.total_loss(out, {"difference": 0.1, "balance": 0.0, "router_z": 0.0})
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    measured = (peak_rss_mb() - before) * 2 ** 20
    return {"size": size, "dtype": dtype, "parameters": report["stages"]["pilot stage 1"]["parameters"]["total"],
            "estimate_gib": round(estimate["total"] / 2 ** 30, 3), "measured_gib": round(measured / 2 ** 30, 3),
            "estimate_over_measured": round(estimate["total"] / measured, 3),
            "estimate_parts_gib": {k: round(v / 2 ** 30, 3) for k, v in estimate.items() if k != "total"}}


def main():
    ap = parser(__doc__)
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "DTYPE"), help="internal: one measurement")
    ap.add_argument("--sizes", nargs="+", default=["0.1B", "0.5B", "1.3B"], choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    rows = []
    for size in (["smoke"] if args.smoke else args.sizes):
        for dtype in args.dtypes:
            out = subprocess.run([sys.executable, __file__, "--one", size, dtype], capture_output=True, text=True,
                                 check=True, cwd=os.path.dirname(__file__))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"# {json.dumps(rows[-1])}", file=sys.stderr, flush=True)   # progress: a row as it is done
    emit("memory_plan", seq=SEQ, batch=BATCH, rows=rows)


if __name__ == "__main__":
    main()
