"""Memory: a model cache that fits a budget, and a job's peak memory estimated before anything loads.

A sweep over variants (`-m model=raw,turbo`) would otherwise keep every DiT it ever loaded: two full-size Krea 2 DiTs
and a text encoder are ~60 GB in bf16. `ModelCache` holds parts under `model.memory_budget_gb` and drops the least
recently used part not needed by the running job before loading another. `check_fits` refuses, in one line, a job
whose weights and activations cannot fit the device in the chosen offload mode, naming a mode that fits — before a
single byte is read.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

log = logging.getLogger(__name__)

GB = 1e9
OFFLOAD_MODES = ("none", "model", "group", "sequential")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------------------ the cache
def module_bytes(obj: Any) -> int:
    """Bytes of an nn.Module's parameters and buffers (each tensor once); 0 for anything else (a tokenizer)."""
    import torch.nn as nn

    if not isinstance(obj, nn.Module):
        return 0
    seen, total = set(), 0
    for t in list(obj.parameters()) + list(obj.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class ModelCache:
    """Loaded parts by key `(part, source, device, dtype, …)`, least recently used first.

    With a budget, loading a part first evicts least recently used parts — never one the running job already
    fetched (`begin_job` starts a job), since the job's pipeline holds those anyway — until the resident parts plus
    the new part's estimate fit. Without a budget nothing is evicted. `load_counts` (real loads per part) and
    `history` (the keys resident after each load) are what tests and logs read."""

    def __init__(self, budget_bytes: float | None = None):
        self.budget_bytes = budget_bytes
        self.parts: OrderedDict[tuple, Any] = OrderedDict()
        self.sizes: dict[tuple, int] = {}
        self.in_use: set[tuple] = set()
        self.load_counts: Counter = Counter()
        self.evicted: list[tuple] = []
        self.history: list[tuple[tuple, ...]] = []
        # The LoRA strength last set on each cached DiT (weak: it goes with the model; a reload starts unset).
        self.lora_strengths: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def begin_job(self, budget_bytes: float | None) -> None:
        """A new job: its budget applies, and no part counts as in use until it fetches it."""
        self.budget_bytes = budget_bytes
        self.in_use.clear()

    def __contains__(self, key: tuple) -> bool:
        return key in self.parts

    def peek(self, key: tuple):
        """The part if resident (marked used, most recent), else None; never loads."""
        if key not in self.parts:
            return None
        return self._touch(key)

    def get(self, key: tuple, build: Callable[[], Any], estimate_bytes: int = 0):
        """The part under `key`, built (after making room for `estimate_bytes`) when not resident."""
        if key in self.parts:
            return self._touch(key)
        self._make_room(estimate_bytes)
        log.info("loading %s from %s", key[0], key[1])
        obj = build()
        self.parts[key], self.sizes[key] = obj, module_bytes(obj)
        self.in_use.add(key)
        self.load_counts[key[0]] += 1
        self._make_room(0)
        self.history.append(tuple(self.parts))
        return obj

    def resident_bytes(self) -> int:
        return sum(self.sizes.values())

    def clear(self) -> None:
        for key in list(self.parts):
            self._drop(key)
        self.load_counts.clear()
        self.history.clear()

    def _touch(self, key: tuple):
        self.parts.move_to_end(key)
        self.in_use.add(key)
        return self.parts[key]

    def _make_room(self, extra: int) -> None:
        if self.budget_bytes is None:
            return
        for key in list(self.parts):  # oldest first
            if self.resident_bytes() + extra <= self.budget_bytes:
                return
            if key not in self.in_use:
                log.info("memory budget %.2f GB: evicting %s (%s, %.2f GB)", self.budget_bytes / GB, key[0], key[1],
                         self.sizes[key] / GB)
                self._drop(key)
                self.evicted.append(key)
        if self.resident_bytes() + extra > self.budget_bytes:
            log.warning("the running job's parts (%.2f GB) exceed model.memory_budget_gb (%.2f GB)",
                        (self.resident_bytes() + extra) / GB, self.budget_bytes / GB)

    def _drop(self, key: tuple) -> None:
        del self.parts[key]
        self.sizes.pop(key, None)
        self.in_use.discard(key)
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- device size
def device_memory_bytes(device) -> int:
    """What the device offers: an accelerator's total memory, or the machine's RAM for the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(memory_budget_gb, device) -> float:
    """`model.memory_budget_gb`: a number of GB, or `auto` = 90% of the device (the rest: activations, allocator)."""
    if memory_budget_gb in (None, "auto"):
        return 0.9 * device_memory_bytes(device)
    return float(memory_budget_gb) * GB


# --------------------------------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class PartSize:
    """One model part as the estimate sees it: its parameters, and the largest group that group offload moves to
    the device at a time (a block: `transformer_blocks.7`, `layers.12`, … or a top-level module) and the largest
    single tensor (sequential offload moves one leaf module at a time)."""

    params: int
    largest_group: int
    largest_tensor: int


def part_size_from_safetensors(files: list[str], prefixes: tuple[str, ...] | None = None) -> PartSize:
    """A part's size from its safetensors headers alone (no tensor is read)."""
    from safetensors import safe_open

    groups: Counter = Counter()
    total = largest = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if prefixes is not None and not key.startswith(prefixes):
                    continue
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
                largest = max(largest, n)
                groups[_group_of(key)] += n
    return PartSize(total, max(groups.values(), default=0), largest)


def _group_of(key: str) -> str:
    """`transformer_blocks.7.attn.to_q.weight` → `transformer_blocks.7`; `norm_out.weight` → `norm_out`."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def safetensors_files(folder_or_file: str) -> list[str]:
    path = Path(folder_or_file)
    if path.is_file():
        return [str(path)]
    return sorted(str(p) for p in path.glob("*.safetensors"))


@dataclass(frozen=True)
class Activations:
    """The geometry a job's activations depend on: image size, text length, DiT width, VAE base width."""

    height: int
    width: int
    text_tokens: int
    dit_hidden: int
    dit_mlp_ratio: float = 4.0
    vae_base_dim: int = 96
    batch: int = 1  # images per pipeline call (`sampler.batch_seeds` puts a prompt's seeds in one call)

    def dit_bytes(self, dtype_bytes: int) -> float:
        """One DiT block's transient tensors for one forward (diffusers runs the CFG branches one after the other):
        the joint sequence [text; image] × (q, k, v, attention out, residual) plus the gated MLP's two hidden
        layers. Attention goes through SDPA, which never materialises the tokens × tokens matrix."""
        tokens = (self.height // 16) * (self.width // 16) + self.text_tokens
        per_token = self.dit_hidden * (5 + 2 * self.dit_mlp_ratio)
        return tokens * per_token * dtype_bytes * self.batch

    def vae_bytes(self, dtype_bytes: int) -> float:
        """VAE decoding at full resolution: about eight feature maps as wide as the decoder's base width."""
        return self.height * self.width * self.vae_base_dim * 8 * dtype_bytes * self.batch


def peak_bytes(parts: dict[str, PartSize], dtype_bytes: int, offload: str, activations: Activations | None) -> float:
    """Peak device memory of one job: weights resident on the device in `offload` mode, plus activations.

    none: every part resident. model: one part at a time (diffusers moves the whole part in, runs it, moves it
    out). group: one block group of a part at a time, two with the prefetch stream. sequential: one tensor at a
    time. Activations are the largest of the DiT's and the VAE's (they never run at once)."""
    weights = {
        "none": sum(p.params for p in parts.values()),
        "model": max((p.params for p in parts.values()), default=0),
        "group": 2 * max((p.largest_group for p in parts.values()), default=0),
        "sequential": 2 * max((p.largest_tensor for p in parts.values()), default=0),
    }[offload] * dtype_bytes
    if activations is None:
        return weights
    act = 0.0
    if "transformer" in parts:
        act = max(act, activations.dit_bytes(dtype_bytes))
    if "vae" in parts:
        act = max(act, activations.vae_bytes(dtype_bytes))
    return weights + act


@dataclass(frozen=True)
class JobMemory:
    """One job's memory picture: its parts (None: unknown), dtype, offload mode, activations, the device budget."""

    parts: dict[str, PartSize] | None
    dtype_bytes: int
    offload: str
    activations: Activations | None
    available: float
    device: str

    def peak(self, offload: str | None = None) -> float:
        return peak_bytes(self.parts or {}, self.dtype_bytes, offload or self.offload, self.activations)

    def activation_bytes(self) -> float:
        return self.peak() - peak_bytes(self.parts or {}, self.dtype_bytes, self.offload, None)

    def cache_budget(self) -> float:
        """What the model cache may keep resident while this job runs: the budget less the job's activations (with
        offload, parts live in CPU memory and the budget is the device's, so the cache keeps everything)."""
        if self.offload != "none":
            return None
        return self.available - self.activation_bytes()

    def check(self) -> None:
        """A one-line ConfigError when the job cannot fit, naming the lightest offload mode that does."""
        need = self.peak()
        if need <= self.available:
            return
        modes = OFFLOAD_MODES if self.device != "cpu" else ("none",)  # offload needs an accelerator to offload to
        fitting = [m for m in modes if self.peak(m) <= self.available]
        detail = ", ".join(f"{name} {p.params * self.dtype_bytes / GB:.3g} GB" for name, p in self.parts.items())
        if fitting:
            fix = f"use model.offload={fitting[0]} (estimated peak {self.peak(fitting[0]) / GB:.3g} GB)"
            if self.offload == "none":
                fix += "; or raise model.memory_budget_gb if the device really has more"
        else:
            fix = ("no offload mode fits: use a larger device (or raise model.memory_budget_gb if it has more), a "
                   "lower resolution, or a conditioning-only job")
        raise ConfigError("model.offload", f"this job needs about {need / GB:.3g} GB on {self.device} with "
                          f"offload={self.offload} ({detail}, plus activations) but {self.available / GB:.3g} GB are "
                          "available", fix)
