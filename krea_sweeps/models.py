"""Model variants (config group `model`): what to load, loaded lazily, part by part, once per process.

A sweep's jobs run one after another in one process (Hydra's basic launcher), so every loaded part lives in the
session's model cache (`memory.ModelCache`) keyed by where it came from; a 10-job sweep loads each part once, and
under `model.memory_budget_gb` the least recently used part goes first. Parameters are frozen once,
at load: toggling `requires_grad` later changes CPU matmul paths and breaks bit-identity against a baseline.

Parts: `tokenizer`, `text_encoder` (Qwen3-VL), `text_path` (`text_fusion` + `txt_in` only — read as safetensors
slices from the DiT checkpoint, so conditioning sweeps never touch the 26 GB of DiT blocks), `transformer` (the full
DiT), `vae`, and `pipeline` (diffusers' `Krea2Pipeline` over the parts).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .configs import VariantFields
from .errors import ConfigError, require, require_finite
from .memory import (OFFLOAD_MODES, Activations, JobMemory, ModelCache, PartSize, part_size_from_safetensors,
                     safetensors_files)
from .synthetic import SELECT_LAYERS, SCHEDULER_CONFIG, RandomWeights

log = logging.getLogger(__name__)

TEXT_PATH_PREFIXES = ("txtfusion.", "txtmlp.", "text_fusion.", "txt_in.")
# Where checkpoints keep the [1, 12] projector: original/ComfyUI names (three prefixes) and diffusers' name.
PROJECTOR_KEYS = ("txtfusion.projector.weight", "model.diffusion_model.txtfusion.projector.weight",
                  "diffusion_model.txtfusion.projector.weight", "text_fusion.projector.weight")




def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class TextPath(nn.Module):
    """`text_fusion` and `txt_in` of a Krea 2 DiT without its blocks: diffusers' own modules, so hooks address them by
    the same names (`text_fusion.projector`, `text_fusion.layerwise_blocks.0.attn`, …) as on the full transformer."""

    def __init__(self, text_fusion: nn.Module, txt_in: nn.Module):
        super().__init__()
        self.text_fusion = text_fusion
        self.txt_in = txt_in

    @classmethod
    def of(cls, transformer: nn.Module) -> "TextPath":
        return cls(transformer.text_fusion, transformer.txt_in)

    def forward(self, taps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Fused text features (after the refiners) exactly as `Krea2Transformer2DModel.forward` computes them."""
        text_mask = mask[:, None, None, :] if mask is not None else None
        return self.text_fusion(taps, attention_mask=text_mask)


@dataclass
class ModelVariant(VariantFields):
    """One Krea 2 variant. `path=None` means the synthetic model (CPU, seconds, not Krea 2's numbers), whose weights
    `synthetic_weights` writes into the cache: the trained toy (`model/synthetic_weights=toy`, the config default) or
    the random-weight one (`random`, the default when built in code: plumbing needs no training)."""

    synthetic_weights: Any = field(default_factory=RandomWeights)

    def __post_init__(self):
        # Types and choices (base, lora, dtype, numbers) are checked by composition (`configs.VariantFields`); what
        # remains are ranges and facts about files.
        require_finite(self.lora_strength, "model.lora_strength")
        require_finite(self.guidance, "model.guidance")
        require(self.steps >= 1, "model.steps", f"{self.steps} steps", "give at least 1 step")
        require(self.guidance >= 0, "model.guidance", f"{self.guidance} < 0",
                "use 0 for no CFG, 4.5 for Raw (diffusers' convention: = CFG 5.5)")
        # allow_network only lets a hub id in model.path be fetched; with no path the synthetic model would run, which
        # is not what someone who turned on the network meant.
        require(not (self.allow_network and self.path is None), "model.allow_network",
                "is true but model.path is not set, so this would run the synthetic model (allow_network only matters "
                "when model.path is a hub id)", f"set model.path to a hub id (e.g. krea/Krea-2-Raw) or a local folder, "
                f"or KREA2_{self.base.upper()}_PATH")
        require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)) is not None, "model.device",
                f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N")
        if self.lora_path is not None:
            self._check_lora_path()
        self.offload = _offload_mode(self.offload)
        if self.offload != "none":
            require(resolve_device(self.device).type != "cpu", "model.offload",
                    f"offload={self.offload} moves parts between CPU memory and an accelerator, but this job runs on "
                    f"the CPU (model.device={self.device})", "use model.offload=none (or run on a GPU machine)")
        if self.memory_budget_gb not in (None, "auto"):
            require_finite(self.memory_budget_gb, "model.memory_budget_gb")
            self.memory_budget_gb = float(self.memory_budget_gb)
            require(self.memory_budget_gb > 0, "model.memory_budget_gb", f"{self.memory_budget_gb} GB",
                    "give a positive number of GB, or auto (90% of the device)")
        if self.path is not None:
            self.path = str(self.path)
            if not _looks_like_hub_id(self.path):
                require(Path(self.path).exists(), "model.path", f"{self.path} does not exist",
                        "point model.path at a diffusers folder or a Krea 2 .safetensors checkpoint, or unset it for "
                        "the synthetic model")
            else:
                require(self.allow_network, "model.path", f"{self.path!r} is not a local path",
                        "download the weights and give their folder, or set model.allow_network=true for a hub id")
            if self.is_single_file:
                for key in ("text_encoder_path", "vae_path", "transformer_config"):
                    require(getattr(self, key) is not None, f"model.{key}", "a single-file checkpoint carries only "
                            "the DiT", f"set model.{key} (or the matching KREA2_* environment variable)")
                _check_krea2_single_file(self.path)
        if self.lora is not None and self.path is not None:
            require(self.lora_path is not None, "model.lora_path", f"{self.name} applies the {self.lora} LoRA, which "
                    "needs its file", f"set model.lora_path (or KREA2_{self.lora.upper()}_LORA)")

    def _check_lora_path(self) -> None:
        """A LoRA file that is used must exist before anything loads; one that would be ignored is refused rather
        than recorded as if it had been applied."""
        require(not self.synthetic, "model.lora_path", "the synthetic model (model.path unset) ignores it: it applies "
                "its own synthetic Turbo LoRA",
                "unset model.lora_path (and KREA2_TURBO_LORA), or set model.path to the real Krea 2 Raw weights")
        lora = Path(str(self.lora_path)).expanduser()
        require(not lora.is_dir(), "model.lora_path", f"{lora} is a folder", "give the LoRA .safetensors file in it")
        require(lora.is_file(), "model.lora_path", f"{lora} does not exist", "give the Turbo LoRA .safetensors file")
        require(os.access(lora, os.R_OK), "model.lora_path", f"{lora} is not readable", "fix its permissions")

    @property
    def synthetic(self) -> bool:
        return self.path is None

    @property
    def is_single_file(self) -> bool:
        return self.path is not None and self.path.endswith(".safetensors")

    def identity(self) -> dict:
        """What makes this variant's outputs what they are (keys the stock-image cache and the resume fingerprint):
        the resolved device and dtype (not `auto`), the files each part is read from (absolute; the synthetic ones
        also by SYNTHETIC_VERSION) and the LoRA with its strength."""
        device = resolve_device(self.device)
        sources = sources_for(self, ensure=False)
        return {"name": self.name, "device": str(device), "dtype": str(resolve_dtype(self.dtype, device)),
                "transformer": sources.transformer, "text_encoder": sources.text_encoder,
                "tokenizer": sources.tokenizer, "vae": sources.vae,
                "synthetic_version": self.synthetic_weights.version if sources.synthetic else None, "lora": sources.lora,
                "lora_strength": float(self.lora_strength) if sources.lora else None,
                "is_distilled": bool(self.is_distilled), "select_layers": list(self.select_layers),
                "files": None if sources.synthetic else _files_identity(sources)}


def _files_identity(sources: "Sources") -> dict:
    """Size, mtime and safetensors-header hash of each part's files: a checkpoint replaced under the same path changes
    the variant's identity (so its jobs rerun and its stock images are regenerated)."""
    from .files import file_identity

    parts = ("transformer", "transformer_config", "text_encoder", "tokenizer", "vae", "lora")
    return {part: file_identity(getattr(sources, part)) for part in parts}


def _offload_mode(value) -> str:
    """`none|model|group|sequential`; `false`/`true` stay accepted as `none`/`model` (the earlier boolean key)."""
    if isinstance(value, bool) or value is None:
        return "model" if value else "none"
    require(value in OFFLOAD_MODES, "model.offload", f"unknown offload mode {value!r}",
            "use none, model (a part at a time), group (a block at a time: 24 GB cards) or sequential (a layer at a "
            "time; slowest)")
    return str(value)


def _looks_like_hub_id(path: str) -> bool:
    return not path.startswith((".", "/", "~")) and path.count("/") == 1 and not Path(path).exists()


def _check_krea2_single_file(path: str) -> None:
    read_projector_weight(path, "model.path")


# ---------------------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Sources:
    """Concrete files for each part of a variant."""

    transformer: str  # single file or diffusers folder
    transformer_config: str | None
    text_encoder: str
    tokenizer: str
    vae: str
    lora: str | None
    synthetic: bool


def sources_for(variant: ModelVariant, ensure: bool = True) -> Sources:
    """The files of each part. `ensure=False` only names them (an identity must not write the synthetic model)."""
    if variant.synthetic:
        weights = variant.synthetic_weights
        root = weights.ensure() if ensure else weights.root()
        return Sources(
            transformer=str(root / f"krea2_{variant.base}.safetensors"),
            transformer_config=str(root / "transformer_config"),
            text_encoder=str(root / "text_encoder"),
            tokenizer=str(root / "tokenizer"),
            vae=str(root / "vae"),
            lora=str(root / f"{variant.lora}_lora.safetensors") if variant.lora is not None else None,
            synthetic=True,
        )
    folder = variant.path
    return Sources(
        transformer=_absolute(variant.path),
        transformer_config=_absolute(variant.transformer_config),
        text_encoder=_absolute(variant.text_encoder_path or f"{folder}/text_encoder"),
        tokenizer=_absolute(variant.tokenizer_path or f"{folder}/tokenizer"),
        vae=_absolute(variant.vae_path or f"{folder}/vae"),
        lora=_absolute(variant.lora_path),
        synthetic=False,
    )


def _absolute(path: str | None) -> str | None:
    """An existing local path absolute and resolved, so caches and fingerprints do not depend on the working
    directory or on how the path was spelt; anything else (a hub id, a missing file: the loader's error) unchanged."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


# ----------------------------------------------------------------------------------------------------------- loading
def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Move without touching dtypes (diffusers warns, rightly, about casting its float32 norms)."""
    return module if device.type == "cpu" else module.to(device)


class LoadedModel:
    """Lazy access to one variant's parts; each part is loaded at first use into `cache` (the session's model cache,
    shared by every job of the process; a fresh one when none is given) and served from there after."""

    def __init__(self, variant: ModelVariant, cache: ModelCache | None = None):
        self.variant = variant
        self.cache = cache if cache is not None else ModelCache()
        self.sources = sources_for(variant)
        self.device = resolve_device(variant.device)
        # With offload, parts stay in CPU memory; diffusers' offload hooks move each to the GPU only while it runs.
        self.load_device = torch.device("cpu") if variant.offload != "none" else self.device
        self.dtype = resolve_dtype(variant.dtype, self.device)
        self._local = not variant.allow_network

    def _key(self, part: str, source: str, *extra) -> tuple:
        return (part, source, str(self.device), str(self.dtype), *extra)

    def _cached(self, key: tuple, build):
        if key in self.cache.parts:  # resident: no estimate (it reads the checkpoint headers: ~1 ms per access)
            return self.cache.get(key, build)
        return self.cache.get(key, build, self._estimate_bytes(key[0]))

    def _estimate_bytes(self, part: str) -> int:
        """Bytes the part will take once loaded, from its safetensors headers (0 when they cannot be read), so the
        cache makes room before loading rather than after."""
        from .memory import DTYPE_BYTES

        if part not in PART_FILES:
            return 0
        try:
            size = part_size(self.sources, part)
        except Exception:  # unreadable headers: the loader reports it
            return 0
        return size.params * DTYPE_BYTES[str(self.dtype).removeprefix("torch.")]

    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return self._cached(self._key("tokenizer", self.sources.tokenizer),
                       lambda: AutoTokenizer.from_pretrained(self.sources.tokenizer, local_files_only=self._local))

    @property
    def text_encoder(self):
        from transformers import Qwen3VLModel
        from transformers.utils import logging as hf_logging

        def build():
            hf_logging.disable_progress_bar()  # one log line per part is enough
            model = Qwen3VLModel.from_pretrained(self.sources.text_encoder, torch_dtype=self.dtype,
                                                 local_files_only=self._local)
            return _freeze(_to_device(model, self.load_device))

        return self._cached(self._key("text_encoder", self.sources.text_encoder), build)

    @property
    def transformer(self):
        """The full DiT, with the LoRA (if any) set to this variant's strength."""
        def build():
            model = _freeze(_to_device(self._load_transformer(), self.load_device))
            if self.sources.lora is not None:
                self._attach_lora(model)
            return model

        model = self._cached(self._key("transformer", self.sources.transformer, self.sources.lora), build)
        self._apply_lora_strength(model)
        return model

    def _apply_lora_strength(self, model) -> None:
        """Every strength of a LoRA variant shares one cached DiT, so the strength is set each time the DiT (or its
        text path) is handed out: a job must never inherit the strength of the job before it."""
        if self.sources.lora is None:
            return
        strength = float(self.variant.lora_strength)
        if self.cache.lora_strengths.get(model) != strength:  # the cache's record, not an attribute on the model
            model.set_adapters(["turbo"], [strength])
            self.cache.lora_strengths[model] = strength

    @property
    def lora_touches_text_path(self) -> bool:
        """Whether the variant's LoRA has weights on `text_fusion` / `txt_in` (diffusers' converter maps them there)."""
        return self.sources.lora is not None and lora_has_text_path_keys(self.sources.lora, self._local)

    @property
    def text_path(self) -> TextPath:
        """The transformer's own text modules when the full DiT is already loaded, else a slice-read of them.

        A LoRA with text-path weights makes the text path depend on the LoRA and its strength, so it is then always
        the full DiT's (peft's LoRA layers, at this variant's strength); the slice-read holds base weights only."""
        if self.lora_touches_text_path:
            return TextPath.of(self.transformer)
        full = self.cache.peek(self._key("transformer", self.sources.transformer, self.sources.lora))
        if full is not None:
            return TextPath.of(full)
        return self._cached(self._key("text_path", self.sources.transformer), self._load_text_path)

    @property
    def vae(self):
        from diffusers import AutoencoderKLQwenImage

        def build():
            model = AutoencoderKLQwenImage.from_pretrained(self.sources.vae, torch_dtype=self.dtype,
                                                           local_files_only=self._local)
            return _freeze(_to_device(model, self.load_device))

        return self._cached(self._key("vae", self.sources.vae), build)

    def pipeline(self, text_encoder: bool | None = True):
        """diffusers' `Krea2Pipeline` over the cached parts (cheap: it only wires them together).

        `text_encoder=False`: without tokenizer and text encoder, for callers that always pass `prompt_embeds`
        (the pipeline touches them only in `get_text_hidden_states`; same images, bit for bit — tests/test_speed.py).
        `None`: with them only when already resident (never loads them; resident ones stay in use for the memory
        budget, as before). Jobs whose prompts all hit the encode cache then never load either."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

        if text_encoder is None:
            text_encoder = (self._key("text_encoder", self.sources.text_encoder) in self.cache
                            and self._key("tokenizer", self.sources.tokenizer) in self.cache)

        pipe = Krea2Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
            vae=self.vae,
            text_encoder=self.text_encoder if text_encoder else None,
            tokenizer=self.tokenizer if text_encoder else None,
            transformer=self.transformer,
            text_encoder_select_layers=tuple(self.variant.select_layers),
            is_distilled=self.variant.is_distilled,
        )
        pipe.set_progress_bar_config(disable=True)
        enable_offload(pipe, self.variant.offload, self.device)
        return pipe

    # ---- transformer loading paths
    def _load_transformer(self):
        from diffusers import Krea2Transformer2DModel

        src = self.sources.transformer
        # The synthetic checkpoints are float32 already; casting them anyway only triggers diffusers' cast warning.
        same = self.sources.synthetic and self.dtype == torch.float32
        dtype = {} if same else {"torch_dtype": self.dtype}
        if src.endswith(".safetensors"):
            model = Krea2Transformer2DModel.from_single_file(
                src, config=self.sources.transformer_config, local_files_only=self._local, **dtype
            )
        else:
            model = Krea2Transformer2DModel.from_pretrained(src, subfolder="transformer", local_files_only=self._local,
                                                            **dtype)
        return keep_fp32_modules(model)

    def _transformer_config(self) -> dict:
        from diffusers import Krea2Transformer2DModel

        if self.sources.transformer.endswith(".safetensors"):
            return dict(Krea2Transformer2DModel.load_config(self.sources.transformer_config,
                                                            local_files_only=self._local))
        return dict(Krea2Transformer2DModel.load_config(self.sources.transformer, subfolder="transformer",
                                                        local_files_only=self._local))

    def _load_text_path(self) -> TextPath:
        """`text_fusion` and `txt_in` alone: the DiT built from its own config on the meta device (no memory, no
        constructor defaults copied here), its text modules taken and their tensors read as safetensors slices."""
        from accelerate import init_empty_weights
        from diffusers import Krea2Transformer2DModel

        with init_empty_weights():
            skeleton = Krea2Transformer2DModel.from_config(self._transformer_config())
        path = TextPath.of(skeleton)
        del skeleton  # the blocks were never allocated; only the text modules live on
        path.load_state_dict(read_text_path_tensors(self.sources.transformer), strict=True, assign=True)
        path.to(device=self.device, dtype=self.dtype)
        # TextPath's parameter names are the DiT's (`text_fusion.…`), so the DiT's own float32 rule applies as is.
        return _freeze(keep_fp32_modules(path))

    def _attach_lora(self, model) -> None:
        from diffusers import Krea2Pipeline

        state_dict = Krea2Pipeline.lora_state_dict(self.sources.lora)
        Krea2Pipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name="turbo")
        model.requires_grad_(False)


def enable_offload(pipe, mode: str, device: torch.device) -> None:
    """diffusers' offload for `model.offload`: `model` moves a whole part to `device` while it runs
    (`enable_model_cpu_offload`), `group` one block at a time with the next one prefetched on a CUDA stream
    (`enable_group_offload`), `sequential` one layer at a time (`enable_sequential_cpu_offload`)."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "group":
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=device.type == "cuda")
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)


PART_FILES = {  # the safetensors files each part is read from (only their headers are read here)
    "text_encoder": lambda src: safetensors_files(src.text_encoder),
    "vae": lambda src: safetensors_files(src.vae),
    "transformer": lambda src: safetensors_files(src.transformer if src.transformer.endswith(".safetensors")
                                                 else str(Path(src.transformer) / "transformer")),
    "text_path": lambda src: text_path_files(src.transformer),
}


def part_size(sources: Sources, part: str) -> PartSize:
    """A part's parameter counts from its checkpoint headers: what `memory` needs, with nothing loaded."""
    return part_size_from_safetensors(PART_FILES[part](sources), TEXT_PATH_PREFIXES if part == "text_path" else None)


def job_parts(needs: frozenset) -> tuple[str, ...]:
    """The weighty parts a job with these metric needs loads: generation needs all three, conditioning the encoder
    and (for text-path metrics) the DiT's text path only."""
    if "images" in needs:
        return ("text_encoder", "transformer", "vae")
    return ("text_encoder", "text_path") if "text_path" in needs else ("text_encoder",)


def job_activations(variant: ModelVariant, sampler, batch: int) -> Activations | None:
    """The activation geometry from the variant's config files (no weights read); None when they are not local."""
    from .synthetic import TRANSFORMER_CONFIG, VAE_CONFIG

    if variant.synthetic:
        dit, vae = TRANSFORMER_CONFIG, VAE_CONFIG
    else:
        sources = sources_for(variant, ensure=False)
        dit_file = (Path(sources.transformer_config) if variant.is_single_file
                    else Path(sources.transformer) / "transformer") / "config.json"
        vae_file = Path(sources.vae) / "config.json"
        if not (dit_file.is_file() and vae_file.is_file()):
            return None
        dit, vae = json.loads(dit_file.read_text()), json.loads(vae_file.read_text())
    hidden = dit.get("num_attention_heads", 48) * dit.get("attention_head_dim", 128)
    return Activations(height=sampler.height, width=sampler.width, text_tokens=sampler.max_sequence_length,
                       dit_hidden=hidden, dit_mlp_ratio=dit.get("intermediate_size", 16384) / hidden,
                       vae_base_dim=vae.get("base_dim", 96), batch=batch)


def job_memory(variant: ModelVariant, sampler, needs: frozenset, seeds: int) -> JobMemory:
    """What a job will hold: its parts' sizes from checkpoint headers (none when they are not on disk yet: the
    synthetic model before its first build, a hub id), its activation geometry, the device's budget."""
    from .memory import DTYPE_BYTES, budget_bytes

    device = resolve_device(variant.device)
    sources = sources_for(variant, ensure=False)
    try:
        parts = {part: part_size(sources, part) for part in job_parts(needs)}
    except Exception:
        parts = None
    batch = seeds if getattr(sampler, "batch_seeds", False) else 1
    activations = job_activations(variant, sampler, batch) if "images" in needs else None
    dtype_bytes = DTYPE_BYTES[str(resolve_dtype(variant.dtype, device)).removeprefix("torch.")]
    return JobMemory(parts, dtype_bytes, variant.offload, activations, budget_bytes(variant.memory_budget_gb, device),
                     str(device))


def check_memory(variant: ModelVariant, sampler, needs: frozenset, seeds: int) -> None:
    """Before any load: refuse, in one line, a job whose estimated peak exceeds what the device offers in the
    chosen offload mode, naming a mode that fits. Skipped when the headers are not on disk yet: the loader then
    reports what is missing."""
    memory = job_memory(variant, sampler, needs, seeds)
    if memory.parts is None:
        log.debug("memory estimate skipped: checkpoint headers not readable yet")
        return
    memory.check()


def text_path_files(source: str) -> list[str]:
    """The safetensors files that may hold the text path: the single file, or the shards an index names for it."""
    if source.endswith(".safetensors"):
        return [source]
    folder = Path(source) / "transformer"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({str(folder / f) for k, f in weight_map.items() if k.startswith(("text_fusion.", "txt_in."))})
    return [str(folder / "diffusion_pytorch_model.safetensors")]


def read_text_path_tensors(source: str) -> dict[str, torch.Tensor]:
    """Read only the `text_fusion` / `txt_in` tensors (safetensors slices) and rename them to diffusers' names."""
    from safetensors import safe_open
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    tensors = {}
    for file in text_path_files(source):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                bare = key.replace("model.diffusion_model.", "")
                if bare.startswith(TEXT_PATH_PREFIXES):
                    tensors[key] = f.get_tensor(key)
    return convert_krea2_transformer_checkpoint_to_diffusers(tensors)


# The modules diffusers' `from_pretrained` keeps in float32 for every dtype on Krea 2 (its RMSNorm scales);
# tests/test_spine.py checks this list against `Krea2Transformer2DModel`'s own declaration.
FP32_MODULES = ("norm", "norm1", "norm2", "norm_q", "norm_k")


def keep_fp32_modules(model: nn.Module, keep: tuple[str, ...] = FP32_MODULES) -> nn.Module:
    """`.float()` on every submodule named in `keep` (a dotted-name component, as diffusers matches them): the rule
    `from_pretrained` applies for every dtype. `from_single_file` keeps them only for float16, so without this a bf16
    single-file DiT, a bf16 diffusers folder and the slice-read text path would each compute the norms differently."""
    for name, module in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in keep:
            module.float()
    return model


@functools.lru_cache(maxsize=None)
def lora_has_text_path_keys(lora: str, local_files_only: bool = True) -> bool:
    """Whether a Krea 2 LoRA (any naming diffusers' Krea 2 loader reads) has weights on `text_fusion` / `txt_in`."""
    from diffusers import Krea2Pipeline

    state_dict = Krea2Pipeline.lora_state_dict(lora, local_files_only=local_files_only)
    return any(k.removeprefix("transformer.").startswith(("text_fusion.", "txt_in.")) for k in state_dict)


def read_projector_weight(source: str, config_key: str) -> tuple[torch.Tensor, str]:
    """The [1, 12] projector weight of a Krea 2 DiT — a single file under any of `PROJECTOR_KEYS`, or a diffusers
    folder (sharded or not) — read alone as a safetensors slice, and the key it was found under. The one reader for
    the export, the projector metric and the checkpoint check; bad input is a ConfigError on `config_key`."""
    from safetensors import SafetensorError, safe_open

    for file in text_path_files(source):
        require(Path(file).is_file(), config_key, f"{file} does not exist",
                "give a Krea 2 .safetensors file or a diffusers folder with transformer/")
        try:
            with safe_open(file, framework="pt") as f:
                key = next((k for k in PROJECTOR_KEYS if k in set(f.keys())), None)
                if key is not None:
                    weight = f.get_tensor(key)
                    require(tuple(weight.shape) == (1, len(SELECT_LAYERS)), config_key,
                            f"{key} has shape {list(weight.shape)}", f"a Krea 2 projector is [1, {len(SELECT_LAYERS)}]")
                    return weight, key
        except SafetensorError as e:
            raise ConfigError(config_key, f"{file} is not safetensors ({e})", "give a .safetensors file") from None
    raise ConfigError(config_key, f"{source} is not a Krea 2 checkpoint (no {' / '.join(PROJECTOR_KEYS)})",
                      "give an original/ComfyUI Krea 2 DiT .safetensors or a diffusers folder")
