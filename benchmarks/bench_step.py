"""Step cost of the connector: one training step (forward, backward, AdamW) of pilot stage 1,
pilot stage 2 (CT-MoA, T=3) and plain LLaVA (fedavg) on the same random base, at the tiny
default size and at LLaVA-like proportions of connector to LLM; reported as ratios to plain.

    python benchmarks/bench_step.py [--device cuda]
"""

import tempfile

import torch

from common import best_time, dtype_for, emit, parser

import data
import model
import pilot

SIZES = {
    "tiny": dict(image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=4,
                 llm_width=128, llm_layers=4, llm_heads=4, llm_mlp=256),
    # LLaVA-1.5-7B / 8 in width, / 4 in depth: C_v:C = 1:4, MLP = 2.7 C, 576/9 = 64 image tokens
    "llava_like": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=6, vision_heads=4,
                       llm_width=512, llm_layers=8, llm_heads=8, llm_mlp=1376),
}


def build_base(sizes: dict, device: str) -> model.Base:
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration
    tok = model.word_tokenizer(data.vocabulary())
    cfg = model.tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, **sizes)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlavaForConditionalGeneration(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        s = sizes["image_size"]
        CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(d)
        return model.load_llava(d, dtype_for(device), device)


def main():
    ap = parser(__doc__)
    args = ap.parse_args()
    dev = args.device
    figures = {"device": dev}
    for size in (["tiny"] if args.smoke else ["tiny", "llava_like"]):
        sizes = dict(SIZES[size], image_size=32) if args.smoke else SIZES[size]
        base = build_base(sizes, dev)
        plain = model.build_connector("plain", base)
        m = model.build_model(base, plain, model.ModelConfig(lora_r=8))
        enc = data.Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens)
        clients = data.synthetic_clients("A", data.DataConfig(clients_per_task=1, train_per_client=8,
                                                              image_size=sizes["image_size"]), 0)
        batch = {k: v.to(dev) for k, v in enc.collate(clients[0].train[:8]).items()}
        stage1 = model.build_connector("stage1", base)
        adapters = {t: stage1.psi_t.state_dict() for t in ("a", "b", "c")}
        stage2 = pilot.ctmoa_from_stage1(stage1, adapters, "a")
        row = {}
        for name, conn in (("plain", plain), ("pilot_stage1", stage1), ("pilot_stage2", stage2)):
            m.set_connector(conn.to(dev))
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

            def step():
                out = m(**batch)
                (out.ce + sum(out.aux.values())).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            row[name + "_s"] = round(best_time(step, dev, repeats=3 if args.smoke else 10), 5)
        row["stage1_over_plain"] = round(row["pilot_stage1_s"] / row["plain_s"], 3)
        row["stage2_over_plain"] = round(row["pilot_stage2_s"] / row["plain_s"], 3)
        lm_params = sum(p.numel() for p in base.lm.parameters())
        row["connector_over_llm_params"] = round(sum(p.numel() for p in plain.parameters()) / lm_params, 4)
        figures[size] = row
    emit("step_cost", **figures)


if __name__ == "__main__":
    main()
