"""What one Flower Deployment-Engine message costs before any work: a fresh process that
imports torch and transformers and loads the base. Measures, each in a fresh process, the
import time and the load time of a LLaVA checkpoint saved with save_pretrained (safetensors,
bf16) from the page cache (read once before timing), at a size this machine holds, and scales
the load to LLaVA-1.5-7B's 14.1 GB of bf16 weights.

    python benchmarks/bench_base_load.py           # a 1.0B-parameter (2 GB) LLaVA
    python benchmarks/bench_base_load.py --smoke   # a tiny one
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from common import emit, parser

LLAVA_7B_BYTES = 7_063_427_072 * 2   # bf16


def build(path: str, smoke: bool) -> int:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    hidden, layers, mlp = (128, 2, 256) if smoke else (2048, 18, 5632)
    vc = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                          image_size=224, patch_size=16)
    tc = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                     num_attention_heads=16 if not smoke else 4, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=31999))
    model.to(torch.bfloat16).save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def load(path: str) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    t1 = time.perf_counter()
    from transformers import LlavaForConditionalGeneration
    LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    return {"import_s": round(t1 - t0, 2), "load_s": round(time.perf_counter() - t1, 2)}


def main():
    ap = parser(__doc__)
    ap.add_argument("--load", metavar="DIR", help="internal: time one load in this fresh process")
    args = ap.parse_args()
    if args.load:
        print(json.dumps(load(args.load)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        n = build(tmp, args.smoke)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors"))
        for f in os.listdir(tmp):   # into the page cache
            with open(os.path.join(tmp, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--load", tmp], capture_output=True, text=True,
                                          check=True).stdout.strip().splitlines()[-1]) for _ in range(1 if args.smoke else 3)]
    best = min(r["load_s"] for r in runs)
    emit("base_load", parameters=n, safetensors_bytes=size, runs=runs,
         load_gb_per_s=round(size / best / 1e9, 2), llava_7b_load_s_scaled=round(LLAVA_7B_BYTES / (size / best), 1))


if __name__ == "__main__":
    main()
