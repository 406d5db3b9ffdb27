"""Synthetic Krea 2: diffusers' and transformers' own classes at tiny sizes, written to disk as real checkpoints.

The real weights (~35 GB) are out of reach, so tests and the CPU demo use the same model classes with seeded random
weights. The DiT is saved in the *original* (ComfyUI, `txtfusion.*`) single-file format and loaded back through
diffusers' single-file loader, so the synthetic model exercises exactly the loading code the real checkpoint uses.

What is real here: the tokenizer (Qwen's BPE), the select_layers [2, 5, ..., 35] (the encoder has 36 decoder layers),
the 12 projector weights (published Raw and Turbo values), the template arithmetic (34-token prefix, 5-token suffix).
Everything else is random: numbers measured on it are not Krea 2 findings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .configs import SELECT_LAYERS  # noqa: F401 - Krea 2's tapped encoder layers (declared with the model schema)
from .tokenizer import copy_tokenizer, default_cache_dir, qwen_tokenizer_folder, start_tokenizer_build

# Bump when the synthetic architecture or seeding changes, so stale caches are never reused.
SYNTHETIC_VERSION = "v1"
VARIANT_SEEDS = {"raw": 0, "turbo": 1}
TEXT_DIM = 32

TEXT_ENCODER_CONFIG = dict(
    text_config=dict(
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=36,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=151936,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    vision_config=dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=TEXT_DIM,
        deepstack_visual_indexes=[0],
        num_position_embeddings=16,
    ),
)

TRANSFORMER_CONFIG = dict(
    in_channels=64,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    timestep_embed_dim=32,
    text_hidden_dim=TEXT_DIM,
    num_text_layers=12,
    text_num_attention_heads=2,
    text_num_key_value_heads=2,
    text_intermediate_size=64,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=(4, 6, 6),
)

VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])

# The real Krea 2 scheduler: resolution-aware exponential shift (Raw) or a fixed mu (Turbo, set by the pipeline).
SCHEDULER_CONFIG = dict(
    use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=6400
)

# Inverse of diffusers' `convert_krea2_transformer_checkpoint_to_diffusers` (a pure key rename).
_PREFIX_TO_ORIGINAL = {
    "img_in.": "first.",
    "time_embed.linear_1.": "tmlp.0.",
    "time_embed.linear_2.": "tmlp.2.",
    "time_mod_proj.": "tproj.1.",
    "txt_in.norm.weight": "txtmlp.0.scale",
    "txt_in.linear_1.": "txtmlp.1.",
    "txt_in.linear_2.": "txtmlp.3.",
    "text_fusion.": "txtfusion.",
    "transformer_blocks.": "blocks.",
    "final_layer.linear.": "last.linear.",
    "final_layer.norm.weight": "last.norm.scale",
    "final_layer.scale_shift_table": "last.modulation.lin",
}
_BLOCK_TO_ORIGINAL = {
    ".attn.to_q.": ".attn.wq.",
    ".attn.to_k.": ".attn.wk.",
    ".attn.to_v.": ".attn.wv.",
    ".attn.to_out.0.": ".attn.wo.",
    ".attn.to_gate.": ".attn.gate.",
    ".attn.norm_q.weight": ".attn.qknorm.qnorm.scale",
    ".attn.norm_k.weight": ".attn.qknorm.knorm.scale",
    ".ff.": ".mlp.",
    ".norm1.weight": ".prenorm.scale",
    ".norm2.weight": ".postnorm.scale",
    ".scale_shift_table": ".mod.lin",
}


def diffusers_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a diffusers Krea 2 DiT state dict with the original checkpoint's (`txtfusion.*`) key names."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for old, repl in _PREFIX_TO_ORIGINAL.items():
            if new.startswith(old):
                new = repl + new[len(old) :]
                break
        if new.startswith("blocks.") or new.startswith("txtfusion."):
            for old, repl in _BLOCK_TO_ORIGINAL.items():
                new = new.replace(old, repl)
        if new.startswith("blocks.") and new.endswith(".mod.lin"):
            value = value.reshape(-1)
        out[new] = value.contiguous()
    return out


def projector_values() -> dict[str, list[float]]:
    """The published Raw and Turbo projector weights (../shared/data/krea2_projector.json, copied into the package)."""
    path = Path(__file__).parent / "data" / "krea2_projector.json"
    data = json.loads(path.read_text())
    if list(data["select_layers"]) != list(SELECT_LAYERS):
        raise RuntimeError(f"{path}: select_layers {data['select_layers']} differ from Krea 2's {SELECT_LAYERS}")
    return {"raw": data["raw"], "turbo": data["turbo"]}


def _seeded(seed: int):
    torch.manual_seed(seed)


def build_text_encoder():
    from transformers import Qwen3VLConfig, Qwen3VLModel

    _seeded(1234)
    return Qwen3VLModel(Qwen3VLConfig(**TEXT_ENCODER_CONFIG)).eval()


def build_transformer(variant: str):
    """Raw from seed 0; Turbo = Raw plus a seeded perturbation, so the two DiTs differ everywhere but stay close
    (the real pair's text_fusion is near-identical). Each gets its own published projector."""
    from diffusers import Krea2Transformer2DModel

    _seeded(VARIANT_SEEDS["raw"])
    model = Krea2Transformer2DModel(**TRANSFORMER_CONFIG).eval()
    # diffusers zero-initialises the RMSNorm scales and modulation tables; give them values so they matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.abs().sum() == 0:
                param.copy_(0.1 * torch.randn_like(param))
        if variant != "raw":
            gen = torch.Generator().manual_seed(VARIANT_SEEDS[variant])
            for param in model.parameters():
                param.add_(0.05 * param.std().nan_to_num(0.02) * torch.randn(param.shape, generator=gen))
        weights = torch.tensor(projector_values()[variant], dtype=torch.float32)
        model.text_fusion.projector.weight.copy_(weights.view(1, 12))
    return model


def build_vae():
    from diffusers import AutoencoderKLQwenImage

    _seeded(4321)
    return AutoencoderKLQwenImage(**VAE_CONFIG).eval()


def build_turbo_lora(config: dict | None = None, rank: int = 2) -> dict[str, torch.Tensor]:
    """A small LoRA for the Raw DiT of `config` (default: the random model's), in the original checkpoint's naming
    (`diffusion_model.blocks.N.attn.wq.lora_A`), standing in for Krea 2's Turbo LoRA so `model=turbo_lora` runs
    through diffusers' real Krea 2 LoRA loader."""
    config = config or TRANSFORMER_CONFIG
    gen = torch.Generator().manual_seed(77)
    hidden = config["attention_head_dim"] * config["num_attention_heads"]
    kv = config["attention_head_dim"] * config["num_key_value_heads"]
    out = {}
    for block in range(config["num_layers"]):
        for name, out_dim in (("wq", hidden), ("wv", kv)):
            key = f"diffusion_model.blocks.{block}.attn.{name}"
            out[f"{key}.lora_A.weight"] = 0.2 * torch.randn(rank, hidden, generator=gen)
            out[f"{key}.lora_B.weight"] = 0.2 * torch.randn(out_dim, rank, generator=gen)
    return out


class RandomWeights:
    """`model/synthetic_weights=random`: the seeded random-weight tiny Krea 2 (plumbing and speed tests)."""

    kind = "random"
    text_hidden_dim = TEXT_DIM
    dit_hidden_dim = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    warning = ("synthetic Krea 2 (tiny, random weights; real tokenizer and projector values): its numbers test the tool, "
               "they are not Krea 2 findings")

    @property
    def version(self) -> str:
        return SYNTHETIC_VERSION

    def root(self, cache_dir: Path | None = None) -> Path:
        return synthetic_root(cache_dir)

    def ensure(self, cache_dir: Path | None = None) -> Path:
        return ensure_synthetic_checkpoints(cache_dir)

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __repr__(self) -> str:
        return "RandomWeights()"


def synthetic_root(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"synthetic-{SYNTHETIC_VERSION}"


def ensure_synthetic_checkpoints(cache_dir: Path | None = None) -> Path:
    """Write the synthetic Krea 2 to disk once per machine (~3 s) and return its folder.

    Layout: `krea2_{raw,turbo}.safetensors` (original single-file format), `transformer_config/` (the diffusers
    config that single-file loading needs offline), `text_encoder/`, `tokenizer/`, `vae/`, `turbo_lora.safetensors`.
    """
    from safetensors.torch import save_file

    from .files import atomic_folder, locked

    root = synthetic_root(cache_dir)
    if (root / "COMPLETE").exists():
        return root
    builder = start_tokenizer_build(cache_dir)  # converts in a child while this process builds the models
    models = {variant: build_transformer(variant) for variant in ("raw", "turbo")}
    tokenizer = qwen_tokenizer_folder(cache_dir, builder)  # its own lock: taken before ours, never inside it
    with locked(root):  # N processes on an empty shared cache: one builds, the others wait and reuse it
        if (root / "COMPLETE").exists():
            return root
        shutil.rmtree(root, ignore_errors=True)  # a folder without COMPLETE is a leftover of an older layout
        with atomic_folder(root) as tmp:
            for variant, model in models.items():
                if variant == "raw":
                    model.save_config(str(tmp / "transformer_config"))
                save_file(diffusers_to_original(model.state_dict()), str(tmp / f"krea2_{variant}.safetensors"))
            build_text_encoder().save_pretrained(str(tmp / "text_encoder"))
            copy_tokenizer(tokenizer, tmp / "tokenizer")
            build_vae().save_pretrained(str(tmp / "vae"))
            save_file(build_turbo_lora(), str(tmp / "turbo_lora.safetensors"))
            (tmp / "COMPLETE").write_text(SYNTHETIC_VERSION)
    return root
