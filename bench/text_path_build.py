"""What building the conditioning-only text path's modules costs at Krea 2's full size, before any weight is read.

    python bench/text_path_build.py [--out bench/text_path_build.json] [--repeats 3]

The text path (`text_fusion` + `txt_in`, ~0.3B of the DiT's 12.8B) is read alone for conditioning-only jobs. Its
modules are built, then their tensors are loaded from safetensors slices (not timed here: the same file reads either
way). Compared on this CPU, float32, diffusers' default Krea 2 config:
- baseline — what the code did before (and what a user writes by hand): construct `Krea2TextFusion` and
  `Krea2TextProjection` with the config's numbers, which allocates and randomly initialises every weight that the
  load then overwrites;
- ours — `accelerate.init_empty_weights()` over `Krea2Transformer2DModel.from_config(config)` (the whole DiT on the
  meta device: no memory, no init), text modules taken from it and filled by `load_state_dict(assign=True)`.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import environment, median, write_json


def config() -> dict:
    from accelerate import init_empty_weights
    from diffusers import Krea2Transformer2DModel

    with init_empty_weights():
        return dict(Krea2Transformer2DModel().config)


def by_hand(cfg: dict):
    from diffusers.models.transformers.transformer_krea2 import Krea2TextFusion, Krea2TextProjection

    text_fusion = Krea2TextFusion(
        num_text_layers=cfg["num_text_layers"], dim=cfg["text_hidden_dim"], num_heads=cfg["text_num_attention_heads"],
        num_kv_heads=cfg["text_num_key_value_heads"], intermediate_size=cfg["text_intermediate_size"],
        num_layerwise_blocks=cfg["num_layerwise_text_blocks"], num_refiner_blocks=cfg["num_refiner_text_blocks"],
        eps=cfg["norm_eps"])
    txt_in = Krea2TextProjection(cfg["text_hidden_dim"], cfg["attention_head_dim"] * cfg["num_attention_heads"],
                                 eps=cfg["norm_eps"])
    return [text_fusion, txt_in]


def from_config(cfg: dict):
    from accelerate import init_empty_weights
    from diffusers import Krea2Transformer2DModel

    with init_empty_weights():
        skeleton = Krea2Transformer2DModel.from_config(cfg)
    return [skeleton.text_fusion, skeleton.txt_in]


def allocated_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if not p.is_meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = config()
    out = {"environment": environment(torch.device("cpu")), "repeats": args.repeats,
           "baseline": "Krea2TextFusion + Krea2TextProjection constructed by hand (allocated, randomly initialised)"}
    for name, build in (("by_hand", by_hand), ("from_config_meta", from_config)):
        times, allocated = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            modules = build(cfg)
            times.append(time.perf_counter() - t0)
            allocated = allocated_bytes(modules)
            del modules
        out[name] = {"median_s": median(times), "allocated_gb": allocated / 1e9,
                     "params": sum(p.numel() for m in build(cfg) for p in m.parameters())}
    out["speedup"] = out["by_hand"]["median_s"] / out["from_config_meta"]["median_s"]
    print(out)
    print("wrote", write_json(out, args.out, "text_path_build.json"))


if __name__ == "__main__":
    main()
