"""P2/P3: the same prompts and seeds through diffusers' eager `Krea2Pipeline` and through krea_sweeps' fast paths.

    python bench/pipeline_speed.py                      # synthetic Krea 2 on CPU, Turbo and Raw (a minute or two)
    python bench/pipeline_speed.py --full               # full-size random-weight Krea 2, bf16, 1024², on the GPU

Every path runs on the same device in one process, prompts encoded once (encoder output cached, as in a sweep):
- `eager`: `sampler.fast=false`, i.e. `Krea2Pipeline.__call__(prompt_embeds=...)` — bit-identical to
  `pipe(prompt)` (tests/test_spine.py), the reference;
- `fast`: padded text trimmed + text path once per image (`sampler.fast=true`, the config default);
- `fast+batch`: the seeds of a prompt in one call (`sampler.batch_seeds=true`);
- `fast+compile`: `compile_repeated_blocks(fullgraph=True)` (CUDA only unless `--compile-cpu`; last, as compiling is
  permanent for the process).
Printed per path: seconds per image, FLOPs and TFLOP/s, speed-up over eager, max |Δ| against eager and (bf16) against
a float32 run of the same weights, peak memory. Then P3: (prompt × intervention) configs/s through `text_fusion`.
Timings are medians over `--repeats` rounds that interleave the paths, so background load hits them alike.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from common import (REPO, count_flops, count_params, environment, full_parts, max_rss_gb, median, peak_memory_gb,
                    pipeline_from, reset_peak_memory, sync, timed, write_json)

PROMPTS = [
    "A red fox sitting in fresh snow, morning light, shallow depth of field.",
    "A lighthouse on a rocky coast at dusk, waves crashing, dramatic clouds.",
    "A bowl of ramen on a wooden table, steam rising, top-down photograph.",
    "An astronaut riding a horse across a desert, cinematic, 35mm film.",
]
VARIANTS = {"turbo": dict(base="turbo", is_distilled=True, steps=8, guidance=0.0), "raw": dict(base="raw", is_distilled=False, steps=28, guidance=4.5)}


# --------------------------------------------------------------------------------------------------- setup
def synthetic_setup(variant: str, device: torch.device, dtype: str):
    from krea_sweeps.models import LoadedModel, ModelVariant

    model = LoadedModel(ModelVariant(name=variant, device=str(device), dtype=dtype, **VARIANTS[variant]))
    return model.pipeline(), model.tokenizer, model.text_encoder, model.variant.select_layers


def full_setup(variant: str, device: torch.device, dtype: torch.dtype):
    parts = full_parts(device, dtype)
    pipe = pipeline_from(parts, distilled=VARIANTS[variant]["is_distilled"])
    print(f"built full-size random-weight Krea 2 in {parts['build_s']:.1f}s: DiT {count_params(parts['transformer'])/1e9:.2f}B, "
          f"text encoder {count_params(parts['text_encoder'])/1e9:.2f}B, VAE {count_params(parts['vae'])/1e6:.0f}M")
    from krea_sweeps.synthetic import SELECT_LAYERS

    return pipe, parts["tokenizer"], parts["text_encoder"], SELECT_LAYERS


@contextmanager
def float32_weights(*modules):
    """Upcast the low-precision parameters in place and cast them back after: bf16 → fp32 → bf16 is exact, so the
    model leaves as it came (its float32 norms are never touched)."""
    touched = []
    for module in modules:
        for p in module.parameters():
            if p.dtype in (torch.bfloat16, torch.float16):
                touched.append((p, p.dtype))
                p.data = p.data.float()
    try:
        yield
    finally:
        for p, dtype in touched:
            p.data = p.data.to(dtype)


# ---------------------------------------------------------------------------------------------------- paths
def path_samplers(base, device: torch.device, compile_cpu: bool, seeds: list[int]) -> dict:
    paths = {"eager": base, "fast": replace(base, fast=True, compile=False)}
    if len(seeds) > 1:
        paths["fast+batch"] = replace(base, fast=True, batch_seeds=True, compile=False)
    if device.type == "cuda" or compile_cpu:
        paths["fast+compile"] = replace(base, fast=True, compile=True)
    return paths


def run_images(pipe, sampler, encoded, neg, seeds):
    from krea_sweeps.sampler import Denoising, generate_many

    out = {}
    for p, cond in enumerate(encoded):
        for s, image in zip(seeds, generate_many(pipe, sampler, cond, neg, seeds, denoising=Denoising())):
            out[(p, s)] = image
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in b if k in a)


def bench_variant(args, variant: str, device: torch.device) -> dict:
    from krea_sweeps.prompts import Encoded, encode
    from krea_sweeps.sampler import Sampler

    dtype = torch.bfloat16 if args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda") \
        else torch.float32
    if args.full:
        pipe, tokenizer, text_encoder, layers = full_setup(variant, device, dtype)
    else:
        pipe, tokenizer, text_encoder, layers = synthetic_setup(variant, device, str(dtype).split(".")[-1])
    # Raw's 28 CFG steps are 7× Turbo's work; on CPU 8 steps keep the default run to minutes (same per-step math).
    steps = args.steps or (VARIANTS[variant]["steps"] if args.full else 8)
    size = args.size or (1024 if args.full else 64)
    base = Sampler(steps=steps, guidance=VARIANTS[variant]["guidance"], height=size, width=size)
    prompts, seeds = PROMPTS[: args.prompts], [int(s) for s in args.seeds.split(",")]

    enc_times = []
    encoded = []
    for prompt in prompts:
        with timed(enc_times, device):
            encoded.append(encode(tokenizer, text_encoder, [prompt], 512, tuple(layers)))
    neg = encode(tokenizer, text_encoder, [""], 512, tuple(layers))
    n_images = len(prompts) * len(seeds)
    valid_tokens = [int(e.mask.sum()) for e in encoded]
    print(f"\n== {variant}: {steps} steps, guidance {base.guidance}, {size}², {dtype}, {len(prompts)} prompts × "
          f"{len(seeds)} seeds; valid text tokens {valid_tokens} of {encoded[0].mask.shape[1]}; encode "
          f"{1e3 * median(enc_times):.1f} ms/prompt")

    paths = path_samplers(base, device, args.compile_cpu, seeds)
    plain = [k for k in paths if k != "fast+compile"]
    results = {k: {"times": []} for k in paths}
    images = {}

    # FLOPs per image, counted once per path outside the timed runs (compiling does not change the math).
    for name in plain:
        with count_flops() as counter:
            run_images(pipe, paths[name], encoded[:1], neg, seeds)
        results[name]["flops_per_image"] = counter.get_total_flops() / len(seeds)
    if "fast+compile" in paths:
        results["fast+compile"]["flops_per_image"] = results["fast"]["flops_per_image"]

    # Warm-up (one image per path), then interleaved timed rounds.
    for name in plain:
        run_images(pipe, paths[name], encoded[:1], neg, seeds[:1])
    for r in range(args.repeats):
        for name in plain:
            reset_peak_memory(device)
            with timed(results[name]["times"], device):
                out = run_images(pipe, paths[name], encoded, neg, seeds)
            results[name]["peak_memory_gb"] = peak_memory_gb(device)
            images.setdefault(name, out)

    # Float32 reference of the same weights (bf16 runs only), before compiling changes the transformer for good.
    reference = None
    if dtype != torch.float32 and not args.no_reference:
        ref_sampler = base
        with float32_weights(pipe.transformer, pipe.vae):
            f32 = [Encoded(e.taps.float(), e.mask) for e in encoded[:1]]
            reference = run_images(pipe, ref_sampler, f32, Encoded(neg.taps.float(), neg.mask), seeds[:1])

    if "fast+compile" in paths:
        t0 = time.perf_counter()
        run_images(pipe, paths["fast+compile"], encoded, neg, seeds)  # compiles (every text length once)
        sync(device)
        results["fast+compile"]["first_pass_s"] = time.perf_counter() - t0
        for r in range(args.repeats):
            reset_peak_memory(device)
            with timed(results["fast+compile"]["times"], device):
                out = run_images(pipe, paths["fast+compile"], encoded, neg, seeds)
            results["fast+compile"]["peak_memory_gb"] = peak_memory_gb(device)
            images.setdefault("fast+compile", out)

    eager_s = median(results["eager"]["times"]) / n_images
    print(f"{'path':<14}{'s/image':>10}{'speed-up':>10}{'GFLOP/img':>12}{'TFLOP/s':>9}{'max|Δ| eager':>14}"
          f"{'max|Δ| fp32':>13}{'peak GB':>9}")
    for name, res in results.items():
        res["s_per_image"] = median(res["times"]) / n_images
        res["speedup_vs_eager"] = eager_s / res["s_per_image"]
        res["tflops"] = res["flops_per_image"] / res["s_per_image"] / 1e12
        res["max_abs_diff_vs_eager"] = max_diff(images[name], images["eager"])
        res["max_abs_diff_vs_float32"] = max_diff(images[name], reference) if reference else None
        ref = f"{res['max_abs_diff_vs_float32']:.2e}" if reference else "-"
        mem = f"{res['peak_memory_gb']:.1f}" if res.get("peak_memory_gb") else "-"
        print(f"{name:<14}{res['s_per_image']:>10.4f}{res['speedup_vs_eager']:>9.2f}×{res['flops_per_image'] / 1e9:>12.1f}"
              f"{res['tflops']:>9.3g}{res['max_abs_diff_vs_eager']:>14.2e}{ref:>13}{mem:>9}")
    fastest = min(results, key=lambda k: results[k]["s_per_image"])
    print(f"fastest: {fastest}, {results[fastest]['speedup_vs_eager']:.2f}× eager (P2 target ≥ 1.3× on a GPU at 1024²)")
    summary = {
        "variant": variant, "steps": steps, "guidance": base.guidance, "size": size, "dtype": str(dtype),
        "prompts": len(prompts), "seeds": seeds, "valid_text_tokens": valid_tokens, "encode_ms_per_prompt":
        1e3 * median(enc_times), "paths": {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
        "fastest": fastest, "speedup": results[fastest]["speedup_vs_eager"],
    }
    summary["p3"] = bench_text_fusion(pipe.transformer.text_fusion, encoded, device, args.p3_repeats)
    return summary


# ------------------------------------------------------------------------------------------------------- P3
@contextmanager
def projector_one_hot(projector, slot: int | None):
    """A (prompt × intervention) config's intervention: the projector "solo" w' = w_k·e_k (None = stock)."""
    if slot is None:
        yield
        return

    def hook(module, args, output):
        w = torch.zeros_like(module.weight)
        w[0, slot] = module.weight[0, slot]
        return F.linear(args[0], w)

    handle = projector.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def bench_text_fusion(text_fusion, encoded, device: torch.device, repeats: int) -> dict:
    """Configs/s through `text_fusion` for prompts × {stock, 12 solo slots}, encoder output cached: one prompt per call
    at the padded length (as a naive loop does) vs all prompts batched and trimmed to the longest valid length."""
    from krea_sweeps.prompts import Encoded
    from krea_sweeps.sampler import trim_padding

    configs = [None] + list(range(12))
    batch = Encoded(torch.cat([e.taps for e in encoded]), torch.cat([e.mask for e in encoded]))
    trimmed = trim_padding(batch)

    def per_prompt():
        for slot in configs:
            with projector_one_hot(text_fusion.projector, slot):
                for e in encoded:
                    text_fusion(e.taps, attention_mask=e.mask[:, None, None, :])

    def batched():
        for slot in configs:
            with projector_one_hot(text_fusion.projector, slot):
                text_fusion(trimmed.taps, attention_mask=trimmed.mask[:, None, None, :])

    n = len(configs) * len(encoded)
    out = {"configs": n, "prompts": len(encoded), "interventions": len(configs)}
    with torch.no_grad():
        for name, fn in (("padded_per_prompt", per_prompt), ("trimmed_batched", batched)):
            fn()
            times = []
            for _ in range(repeats):
                with timed(times, device):
                    fn()
            out[f"{name}_configs_per_s"] = n / median(times)
    print(f"P3 text_fusion: {out['padded_per_prompt_configs_per_s']:.0f} configs/s padded, one prompt per call; "
          f"{out['trimmed_batched_configs_per_s']:.0f} configs/s trimmed and batched ({n} configs = "
          f"{len(encoded)} prompts × {len(configs)} interventions; target ≥ 100/s on a GPU)")
    return out


# ------------------------------------------------------------------------------------------------- dry run
def full_dry_run(size: int, text_tokens: int, steps: int) -> dict:
    """The full-size DiT on the meta device (no memory, no GPU): parameters and FLOPs per forward, eager (512 padded
    tokens + mask, text path every step) vs fast (valid tokens only, text path once per image) — the arithmetic the
    GPU run will time."""
    from common import build_full_transformer

    meta = torch.device("meta")
    dit = build_full_transformer(meta, torch.bfloat16)
    n_img = (size // 16) ** 2

    def forward_flops(text_len: int, masked: bool) -> float:
        kw = dict(hidden_states=torch.empty(1, n_img, 64, device=meta, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.empty(1, text_len, 12, 2560, device=meta, dtype=torch.bfloat16),
                  timestep=torch.ones(1, device=meta), position_ids=torch.zeros(text_len + n_img, 3, device=meta),
                  encoder_attention_mask=torch.ones(1, text_len, dtype=torch.bool, device=meta) if masked else None)
        with count_flops() as c:
            dit(**kw)
        return c.get_total_flops()

    def text_flops(text_len: int) -> float:
        with count_flops() as c:
            dit.text_fusion(torch.empty(1, text_len, 12, 2560, device=meta, dtype=torch.bfloat16))
        return c.get_total_flops()

    eager, trimmed = forward_flops(512, True), forward_flops(text_tokens, False)
    tf_trim = text_flops(text_tokens)
    out = {"dit_params_b": count_params(dit) / 1e9, "size": size, "text_tokens": text_tokens, "steps": steps,
           "tflop_per_forward_eager": eager / 1e12, "tflop_per_forward_trimmed": trimmed / 1e12,
           "tflop_text_fusion_512": text_flops(512) / 1e12, "tflop_text_fusion_trimmed": tf_trim / 1e12,
           "tflop_per_image_eager": steps * eager / 1e12,
           "tflop_per_image_fast": (steps * (trimmed - tf_trim) + tf_trim) / 1e12}
    out["flop_ratio"] = out["tflop_per_image_eager"] / out["tflop_per_image_fast"]
    print(f"full-size DiT {out['dit_params_b']:.2f}B params; at {size}², one forward: eager (512 padded text tokens) "
          f"{out['tflop_per_forward_eager']:.1f} TFLOP, trimmed ({text_tokens} tokens) {out['tflop_per_forward_trimmed']:.1f} "
          f"TFLOP; text_fusion {out['tflop_text_fusion_512']:.2f} → {out['tflop_text_fusion_trimmed']:.3f} TFLOP")
    print(f"per {steps}-step image (no CFG): eager {out['tflop_per_image_eager']:.0f} TFLOP, fast "
          f"{out['tflop_per_image_fast']:.0f} TFLOP → {out['flop_ratio']:.2f}× fewer FLOPs before any kernel speed-up")
    return out


# ------------------------------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size random-weight Krea 2 (GPU)")
    parser.add_argument("--variants", default=None, help="turbo,raw (default: both on CPU, turbo with --full)")
    parser.add_argument("--prompts", type=int, default=None, help="how many prompts (default 2)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: the variant's with --full, 8 on CPU)")
    parser.add_argument("--size", type=int, default=None, help="height = width (default 64 CPU, 1024 full)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3 CPU, 2 full)")
    parser.add_argument("--p3-repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--compile-cpu", action="store_true", help="also time torch.compile on CPU")
    parser.add_argument("--no-reference", action="store_true", help="skip the float32 reference of bf16 runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --full: parameters and FLOPs of the full-size DiT on the meta device (CPU, seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/pipeline_speed[_full].json)")
    args = parser.parse_args()
    if args.full and args.dry_run:
        report = {"benchmark": "pipeline_speed", "dry_run": full_dry_run(args.size or 1024, 40, args.steps or 8)}
        print(f"wrote {write_json(report, args.out, 'pipeline_speed_dry_run.json')}")
        return
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.full and device.type != "cuda":
        parser.error("--full builds a 17B-parameter model: it needs a CUDA device")
    args.prompts = args.prompts or 2
    args.repeats = args.repeats or (2 if args.full else 3)
    variants = (args.variants or ("turbo" if args.full else "turbo,raw")).split(",")

    from krea_sweeps.process import apply_torch_threads, torch_threads_for

    # The runs' own default (`torch_threads=auto`): 1 thread on CPU for the synthetic model, so a shared machine does
    # not turn the ratios into thrash; KREA_SWEEPS_TORCH_THREADS overrides.
    apply_torch_threads(torch_threads_for("auto", synthetic=not args.full, device=device.type))
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | diffusers {env['diffusers']} | load avg {env['load_average']:.2f}")
    t0 = time.perf_counter()
    report = {"benchmark": "pipeline_speed", "full": args.full, "environment": env,
              "variants": {v: bench_variant(args, v, device) for v in variants}}
    report["wall_s"] = time.perf_counter() - t0
    report["max_rss_gb"] = max_rss_gb()
    path = write_json(report, args.out, "pipeline_speed_full.json" if args.full else "pipeline_speed.json")
    print(f"\nwall {report['wall_s']:.1f}s; wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
