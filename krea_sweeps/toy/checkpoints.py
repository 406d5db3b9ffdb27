"""The toy Krea 2 written into the cache as real checkpoints, the same layout as the random synthetic model.

The committed weights (`weights/`: the DiTs already in the original `txtfusion.*` single-file format, the VAE, the
manifest) are copied next to a freshly built text encoder and tokenizer, so `LoadedModel` reads them through exactly
the loaders it uses for the real weights. The folder is named by the weights' hash: new weights never reuse a stale
cache.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import copy_tokenizer, default_cache_dir, qwen_tokenizer_folder, start_tokenizer_build

WEIGHTS_DIR = Path(__file__).parent / "weights"
TOY_WARNING = ("toy Krea 2 (tiny, trained on CPU on a procedural world of shapes; real tokenizer and projector values): "
               "its numbers test the tool and the methods, they are not Krea 2 findings")


def manifest() -> dict:
    file = WEIGHTS_DIR / "manifest.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: train the toy with `python -m krea_sweeps.toy.train`")
    stat = file.stat()
    return _read_manifest(str(file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_manifest(path: str, mtime_ns: int, size: int) -> dict:
    """Read once per version of the file (every variant identity asks for it: thousands of times in a batch)."""
    return json.loads(Path(path).read_text())


@dataclass
class ToyWeights:
    """`model/synthetic_weights=toy`: the trained toy Krea 2 (prompts from `prompts=toy` are drawn and rendered)."""

    kind: str = "toy"

    @property
    def version(self) -> str:
        return f"toy-{manifest()['weights_sha256'][:16]}"

    @property
    def warning(self) -> str:
        return TOY_WARNING

    @property
    def text_hidden_dim(self) -> int:
        return int(json.loads((WEIGHTS_DIR / "toy_transformer_config.json").read_text())["text_hidden_dim"])

    @property
    def dit_hidden_dim(self) -> int:
        config = json.loads((WEIGHTS_DIR / "toy_transformer_config.json").read_text())
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])

    def root(self, cache_dir: Path | None = None) -> Path:
        return Path(cache_dir or default_cache_dir()) / self.version

    def ensure(self, cache_dir: Path | None = None) -> Path:
        return ensure_toy_checkpoints(cache_dir)


def ensure_toy_checkpoints(cache_dir: Path | None = None) -> Path:
    """Write the toy's folder once per machine and return it. Layout as `synthetic.ensure_synthetic_checkpoints`:
    `krea2_{raw,turbo}.safetensors`, `transformer_config/`, `text_encoder/`, `tokenizer/`, `vae/`,
    `turbo_lora.safetensors` (a small LoRA of the toy's shapes, for `model=turbo_lora`)."""
    root = ToyWeights().root(cache_dir)
    if (root / "COMPLETE").exists():  # before the imports below: diffusers' autoencoders alone take seconds
        return root
    builder = start_tokenizer_build(cache_dir)  # converts in a child while this process imports and builds
    from diffusers import AutoencoderKLQwenImage, Krea2Transformer2DModel
    from safetensors.torch import load_file, save_file

    from ..synthetic import build_text_encoder, build_turbo_lora
    from .train import state_hash

    from ..files import atomic_folder, locked

    info = manifest()
    encoder = build_text_encoder()
    if state_hash(encoder.state_dict()) != info["text_encoder_sha256"]:
        raise RuntimeError("this torch builds a different tiny text encoder than the one the toy was trained with "
                           f"(torch {info['versions']['torch']}): retrain with `python -m krea_sweeps.toy.train`")
    tokenizer = qwen_tokenizer_folder(cache_dir, builder)  # its own lock: taken before ours, never inside it
    with locked(root):  # N processes on an empty shared cache: one builds, the others wait and reuse it
        if (root / "COMPLETE").exists():
            return root
        shutil.rmtree(root, ignore_errors=True)
        with atomic_folder(root) as tmp:
            encoder.save_pretrained(str(tmp / "text_encoder"))
            copy_tokenizer(tokenizer, tmp / "tokenizer")
            for variant in ("raw", "turbo"):
                shutil.copyfile(WEIGHTS_DIR / f"toy_{variant}.safetensors", tmp / f"krea2_{variant}.safetensors")
            config = json.loads((WEIGHTS_DIR / "toy_transformer_config.json").read_text())
            Krea2Transformer2DModel.from_config(config).save_config(str(tmp / "transformer_config"))
            vae_config = json.loads((WEIGHTS_DIR / "toy_vae_config.json").read_text())
            vae = AutoencoderKLQwenImage.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
            vae.load_state_dict(load_file(str(WEIGHTS_DIR / "toy_vae.safetensors")))
            vae.save_pretrained(str(tmp / "vae"))
            save_file(build_turbo_lora(config), str(tmp / "turbo_lora.safetensors"))
            (tmp / "COMPLETE").write_text(info["weights_sha256"])
    return root
