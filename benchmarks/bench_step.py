"""Step cost of the connector: one training step (forward, backward, AdamW) of pilot stage 1,
pilot stage 2 (CT-MoA, T=3) and plain LLaVA (fedavg) on the same RANDOM base (no download),
reported as time, tokens per second, achieved TFLOP/s (and model FLOPs utilisation when
--peak-tflops is given), peak GPU memory, and ratios to plain LLaVA; then scoring's cost: one
batch of greedy answers with the KV cache through stage 2's CT-MoA (`generate`).

Shapes: `tiny` (the embedded default's), `llava_like` (LLaVA-1.5-7B / 8 in width and / 4 in
depth: C_v:C = 1:4, MLP 2.7 C, 64 image tokens) and `7b` (LLaVA-1.5-7B itself: 576 image
tokens, bf16, gradient checkpointing; needs a GPU with ~40 GB).

    python benchmarks/bench_step.py                                   # tiny + llava_like, CPU
    python benchmarks/bench_step.py --device cuda --shapes 7b --peak-tflops 989   # H100 bf16 dense
"""

import torch

from common import best_time, dtype_for, emit, parser

import model
import pilot
from tools import embedded

SIZES = {
    "tiny": dict(image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=4,
                 llm_width=128, llm_layers=4, llm_heads=4, llm_mlp=256),
    "llava_like": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=6, vision_heads=4,
                       llm_width=512, llm_layers=8, llm_heads=8, llm_mlp=1376),
}


def random_base(shape: str, device: str) -> model.Base:
    from transformers import LlavaForConditionalGeneration
    if shape == "7b":
        config = model.llava_15_7b_config()
    else:
        config = embedded.tiny_llava_config(100, 4, 0, **SIZES[shape])
    with torch.device(device):   # built in place, in the final dtype: no fp32 copy of 7B
        torch.manual_seed(0)
        llava = LlavaForConditionalGeneration._from_config(config, dtype=dtype_for(device))
    return model.base_from_llava(llava, None, None, shape)


def time_step(m, conn, batch: dict, dev: str, repeats: int, flops: float, peak_tflops) -> dict:
    """One training step of `m` with connector `conn`: best time, tokens/s, TFLOP/s (MFU)."""
    m.set_connector(conn.to(dev))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
            out = m(**batch)
            loss = out.ce + sum(out.aux.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = best_time(step, dev, repeats=repeats)
    tokens = batch["input_ids"].numel()
    r = {"step_s": round(t, 5), "tokens_per_s": round(tokens / t, 1), "achieved_tflops": round(flops / t / 1e12, 4)}
    if peak_tflops:
        r["mfu"] = round(flops / t / 1e12 / peak_tflops, 4)
    if dev.startswith("cuda"):
        r["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return r


def time_generate(m, conn, batch: dict, dev: str, prompt_len: int, max_new_tokens: int, repeats: int) -> dict:
    """Scoring's cost: greedy generation with the KV cache (PilotLlava.generate, as
    model.evaluate calls it) of one batch of prompts of `prompt_len` tokens, image included.
    The random base rarely emits EOS, so every answer runs the whole `max_new_tokens`."""
    m.set_connector(conn.to(dev))
    m.eval()
    prompt = dict(input_ids=batch["input_ids"][:, :prompt_len], attention_mask=batch["attention_mask"][:, :prompt_len],
                  pixel_values=batch["pixel_values"])
    lengths = []

    def gen():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
            lengths.append(max(len(s) for s in m.generate(**prompt, max_new_tokens=max_new_tokens,
                                                           eos_token_id=2, pad_token_id=0)))   # LLaMA ids
    t = best_time(gen, dev, repeats=repeats)
    m.train()
    B = prompt["input_ids"].shape[0]
    return {"batch": B, "prompt_tokens": prompt_len, "max_new_tokens": max_new_tokens, "longest_answer": lengths[-1],
            "batch_s": round(t, 5), "answers_per_s": round(B / t, 1)}


def measure(shape: str, args) -> dict:
    """Plain, stage-1 and stage-2 steps on one random base of `shape`."""
    dev = args.device
    base = random_base(shape, dev)
    plain = model.build_connector("plain", base)
    cfg = model.ModelConfig(lora_r=64 if shape == "7b" else 8, lora_alpha=16.0, gradient_checkpointing=shape == "7b")
    m = model.build_model(base, plain, cfg)
    B, N, L = args.batch_size, base.n_image_tokens, args.text_tokens
    vc = base.vision.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, base.lm.config.vocab_size, (B, L + N), generator=g)
    ids[:, 4:4 + N] = base.image_token_id                    # the image sits after a short prefix
    labels = torch.full_like(ids, -100)
    labels[:, -L // 2:] = ids[:, -L // 2:]                   # supervise the last half of the text
    batch = dict(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), labels=labels.to(dev),
                 pixel_values=torch.randn(B, 3, vc.image_size, vc.image_size, generator=g).to(dev))
    stage1 = model.build_connector("stage1", base)
    stage2 = pilot.stage2_from_stage1(stage1, {t: stage1.psi_t.state_dict() for t in "abc"}, "a")
    p_lm = sum(p.numel() for p in base.lm.parameters())
    p_vision = sum(p.numel() for p in base.vision.parameters())
    # frozen weights: forward 2 P t, backward only activation gradients 2 P t (no weight grads);
    # gradient checkpointing adds one more LLM forward; vision runs forward only
    flops = (6 if cfg.gradient_checkpointing else 4) * p_lm * B * (L + N) + 2 * p_vision * B * (N + 1)
    repeats = 3 if args.smoke or shape == "7b" else 10
    row = {"image_tokens": N, "tokens_per_step": B * (L + N)}
    for name, conn in (("plain", plain), ("pilot_stage1", stage1), ("pilot_stage2", stage2)):
        row[name] = time_step(m, conn, batch, dev, repeats, flops, args.peak_tflops)
    # scoring: eval_batch_size prompts (the image and the first text tokens) at once, stage 2's CT-MoA
    gen_batch = {k: v[:1].expand(args.eval_batch_size, *v.shape[1:]).contiguous() for k, v in batch.items()}
    row["generate"] = time_generate(m, stage2, gen_batch, dev, 4 + N + min(L, 32), args.max_new_tokens, repeats)
    row["stage1_over_plain"] = round(row["pilot_stage1"]["step_s"] / row["plain"]["step_s"], 3)
    row["stage2_over_plain"] = round(row["pilot_stage2"]["step_s"] / row["plain"]["step_s"], 3)
    row["connector_over_llm_params"] = round(sum(p.numel() for p in plain.parameters()) / p_lm, 4)
    return row


def main():
    ap = parser(__doc__)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "llava_like"], choices=["tiny", "llava_like", "7b"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=64, help="prompt + answer tokens beside the image")
    ap.add_argument("--eval-batch-size", type=int, default=32, help="prompts scored at once (fed.eval_batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="answer length scored (data.max_new_tokens)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    args = ap.parse_args()
    figures = {"device": args.device, "batch_size": args.batch_size}
    for shape in (["tiny"] if args.smoke else args.shapes):
        figures[shape] = measure(shape, args)
    emit("step_cost", **figures)


if __name__ == "__main__":
    main()
