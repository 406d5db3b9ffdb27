"""What recording word maps costs: FLOPs at full size (meta-device dry run) and wall time on the synthetic model.

    python bench/word_maps_cost.py [--out bench/word_maps_cost.json] [--size 256] [--repeats 5]

1. Dry run: diffusers' default `Krea2Transformer2DModel` (Krea 2's DiT: 28 blocks, 48 heads × 128) built on the meta
   device (no memory, no weights), one denoising step at 1024² (4096 image tokens) with 40 text tokens, FLOPs counted
   by torch's FlopCounterMode — stock, then with the word-map recorder on every block. Baseline: the same DiT step
   without the metric (what a user runs instead).
2. Wall time on this machine: the synthetic Krea 2 (CPU), one image at `--size`² through Krea2Pipeline, with and
   without recording (median of `--repeats`). Baseline: the same generation without the metric.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import count_flops, environment, median, write_json


def dry_run_flops(text_tokens: int = 40, size: int = 1024) -> dict:
    from common import build_full_transformer

    from krea_sweeps.interventions import InterventionContext
    from krea_sweeps.interventions.hooks import probing
    from krea_sweeps.metrics.word_maps import MapSink, TextAttentionProcessor
    from krea_sweeps.sampler import Denoising

    meta = torch.device("meta")
    model = build_full_transformer(meta, torch.bfloat16)
    grid = size // 16
    n_img = grid * grid
    inputs = dict(
        hidden_states=torch.empty(1, n_img, 64, device=meta, dtype=torch.bfloat16),
        encoder_hidden_states=torch.empty(1, text_tokens, 12, 2560, device=meta, dtype=torch.bfloat16),
        timestep=torch.empty(1, device=meta, dtype=torch.bfloat16),
        position_ids=torch.zeros(text_tokens + n_img, 3, device=meta),
    )
    with torch.no_grad(), count_flops() as stock:
        model(**inputs)
    sink = MapSink(Denoising(), None, None, n_img, 1, [0], chunk=256)
    sink.add = lambda maps: None  # meta tensors hold no values to accumulate
    blocks = list(model.transformer_blocks)
    with torch.no_grad(), probing(InterventionContext(transformer=model), "dit_attention", "word_maps",
                                  lambda old, i: TextAttentionProcessor(old, sink, i)), count_flops() as recorded:
        model(**inputs)
    extra = recorded.get_total_flops() - stock.get_total_flops()
    return {"image_tokens": n_img, "text_tokens": text_tokens, "blocks": len(blocks), "heads": 48, "head_dim": 128,
            "dit_step_tflop": stock.get_total_flops() / 1e12, "word_maps_extra_tflop": extra / 1e12,
            "ratio": extra / stock.get_total_flops()}


def cpu_wall_time(size: int, repeats: int) -> dict:
    from krea_sweeps.interventions import InterventionContext
    from krea_sweeps.interventions.hooks import probing
    from krea_sweeps.metrics.word_maps import MapSink, TextAttentionProcessor
    from krea_sweeps.models import LoadedModel, ModelVariant
    from krea_sweeps.prompts import EncodeCache
    from krea_sweeps.sampler import Denoising, Sampler, generate_many

    model = LoadedModel(ModelVariant(name="turbo", base="turbo", is_distilled=True, steps=8, guidance=0.0))
    pipe = model.pipeline()
    sampler = Sampler(steps=8, fast=True, height=size, width=size).resolved(model.variant)
    cache = EncodeCache(None)
    cond, neg = (cache.get(model, [p], 512) for p in ["a red fox sitting in fresh snow", ""])

    def plain():
        return generate_many(pipe, sampler, cond, neg, [0], denoising=Denoising())

    def recording():
        state = Denoising()
        sink = MapSink(state, None, None, (size // 16) ** 2, sampler.steps, [0], chunk=256)
        with probing(InterventionContext(transformer=pipe.transformer, denoising=state), "dit_attention",
                     "word_maps", lambda old, i: TextAttentionProcessor(old, sink, i)):
            return generate_many(pipe, sampler, cond, neg, [0], denoising=state)

    times = {"plain": [], "recording": []}
    plain(), recording()  # warm-up
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("recording", recording)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    same = bool((plain()[0] == recording()[0]).all())
    return {"size": size, "steps": sampler.steps, "plain_s": median(times["plain"]),
            "recording_s": median(times["recording"]),
            "overhead": median(times["recording"]) / median(times["plain"]) - 1, "image_bit_identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out = {"environment": environment(torch.device("cpu")), "dry_run_1024": dry_run_flops(),
           "synthetic_cpu": cpu_wall_time(args.size, args.repeats),
           "baseline": "the same DiT step / generation without the word_maps recorder"}
    print(out)
    print("wrote", write_json(out, args.out, "word_maps_cost.json"))


if __name__ == "__main__":
    main()
