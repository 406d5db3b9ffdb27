"""Typed config groups: the fields of `model`, `sampler`, `prompts` and `wandb`, registered in Hydra's ConfigStore.

Each group's YAML lists its schema first in its defaults (`- _schema`), so Hydra composes onto a typed node: a value of
the wrong type (`sampler.steps=abc`), a choice that is not one (`wandb.mode=ofline`) or a key that does not exist
(`sampler.stepz=3`) fails during composition, naming the key — before any of our code runs, for every launcher and
sweeper. `composition_error` turns OmegaConf's message into the project's one line (key, problem, fix, did you mean).

The runtime classes (`models.ModelVariant`, `sampler.Sampler`, `prompts.PromptSet`, `tracking.WandbConfig`) subclass
these dataclasses, so a field is declared once. This module imports no torch: `--help` and config errors stay instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from enum import StrEnum
from typing import Any, Callable

from .errors import ConfigError, did_you_mean


SELECT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)  # Krea 2's tapped encoder layers (0 = embeddings)


# --------------------------------------------------------------------------------------------------------- choices
class Base(StrEnum):
    """The DiT checkpoints a variant can start from."""

    raw = "raw"
    turbo = "turbo"


class Lora(StrEnum):
    """The LoRAs a variant can apply on top of its base (the synthetic model writes `<lora>_lora.safetensors`)."""

    turbo = "turbo"


class DType(StrEnum):
    auto = "auto"  # bfloat16 on CUDA, float32 on the CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class WandbMode(StrEnum):
    auto = "auto"  # online with an API key, else offline into the job folder
    online = "online"
    offline = "offline"
    disabled = "disabled"


# --------------------------------------------------------------------------------------------------------- schemas
@dataclass
class VariantFields:
    """`model`: one Krea 2 variant (`conf/model/*.yaml`): what it is comes from `base` and `lora`; `name` labels it."""

    name: str
    base: Base
    lora: Lora | None = None
    path: str | None = None
    text_encoder_path: str | None = None
    tokenizer_path: str | None = None
    vae_path: str | None = None
    transformer_config: str | None = None
    lora_path: str | None = None
    lora_strength: float = 1.0
    is_distilled: bool = False
    steps: int = 28
    guidance: float = 4.5
    device: str = "auto"
    dtype: DType = DType.auto
    allow_network: bool = False
    offload: Any = "none"  # none | model | group | sequential (true / false: the earlier boolean key)
    memory_budget_gb: Any = "auto"  # GB, or auto
    select_layers: list[int] = field(default_factory=lambda: list(SELECT_LAYERS))
    synthetic_weights: Any = None  # `model/synthetic_weights`: random | toy


@dataclass
class SamplerFields:
    """`sampler`: how images are generated (null = the variant's or the model's default)."""

    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int = 512
    negative_prompt: str = ""
    fast: bool = False
    trim_padding: bool = True
    cache_text_path: bool = True
    batch_seeds: bool = False
    compile: bool | str = "auto"  # auto | true | false


@dataclass
class PromptSetFields:
    """`prompts`: a named list of prompts."""

    name: str
    prompts: list[str] = field(default_factory=list)


@dataclass
class PromptFileFields(PromptSetFields):
    """`prompts=file`: one prompt per line of `path`."""

    path: str | None = None


@dataclass
class WandbFields:
    """`wandb`: where each job's run goes."""

    mode: WandbMode = WandbMode.auto
    project: str = "krea_sweeps"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    log_images: bool = True


def schema(fields: type, target: str) -> type:
    """`fields` plus the `_target_` Hydra instantiates (a user's own subclass may replace it; `build` checks it).
    Made at import and named in this module: a launcher that pickles a composed config (submitit, Ray) unpickles
    its typed nodes by importing their class from here."""
    name = f"{fields.__name__.removesuffix('Fields')}Schema"
    made = make_dataclass(name, [("_target_", str, field(default=target))], bases=(fields,))
    made.__module__ = __name__
    globals()[name] = made
    return made


# (group, schema name in the group, schema): each group's YAML lists its schema name first in its defaults.
SCHEMAS = (
    ("model", "_schema", schema(VariantFields, "krea_sweeps.models.ModelVariant")),
    ("sampler", "_schema", schema(SamplerFields, "krea_sweeps.sampler.Sampler")),
    ("prompts", "_schema", schema(PromptSetFields, "krea_sweeps.prompts.PromptSet")),
    ("prompts", "_schema_file", schema(PromptFileFields, "krea_sweeps.prompts.PromptFile")),
    ("wandb", "_schema", schema(WandbFields, "krea_sweeps.tracking.WandbConfig")),
)


def register_schemas() -> None:
    """Put each group's schema in Hydra's ConfigStore (idempotent): call before composing."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        store.store(group=group, name=name, node=node)


# ------------------------------------------------------------------------------------------------ one-line errors
_FULL_KEY = re.compile(r"full_key: (\S+)")
_NOT_CONVERTED = re.compile(r"Value '(.*)' (?:of type '\w+' could not be converted to (\w+)|is not a valid (bool))")
_NOT_A_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")
_NO_KEY = re.compile(r"Key '([^']+)' not in '\w+'|Could not override '([^']+)'|Key '([^']+)' is not in struct")
_TYPE_WORDS = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false", "String": "text"}


def composition_error(error: BaseException, keys: Callable[[], list[str]] | None = None) -> ConfigError | None:
    """Hydra's composition error as one ConfigError naming the key, or None when it is not about one key's value or
    name (the caller reports it its own way). `keys()`: every key of the config, for "did you mean" on a misspelt
    key (asked only then: it composes again)."""
    text = _chain_text(error)
    found = _FULL_KEY.search(text)
    key = found.group(1) if found else None
    if (m := _NOT_CONVERTED.search(text)) and key:
        value, kind = m.group(1), {"bool": "Boolean"}.get(m.group(3), m.group(2))
        return ConfigError(key, f"{value!r} is not {_TYPE_WORDS.get(kind, kind)}",
                           f"give {_TYPE_WORDS.get(kind, kind)} (`python run.py --cfg job` shows the current value)")
    if (m := _NOT_A_CHOICE.search(text)) and key:
        value, options = m.group(1), [o.strip() for o in m.group(2).split(",")]
        return ConfigError(key, f"unknown value {value!r}", f"{did_you_mean(value, options)}use one of: "
                           f"{', '.join(options)}")
    if m := _NO_KEY.search(text):
        key = key or next(g for g in m.groups() if g)
        return ConfigError(key, "no such key in this config",
                           f"{did_you_mean(key, keys() if keys else [])}check the spelling (`python run.py --cfg job` "
                           "lists every key; `++key=value` adds a new one)")
    return None


def _chain_text(error: BaseException) -> str:
    """The messages of `error` and every exception below it (Hydra wraps OmegaConf's, which names the key)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)
