"""Typed configs: the fields of every config group (`model`, `sampler`, `prompts`, `intervention`, `metrics`, `wandb`)
and of the top-level keys, registered in Hydra's ConfigStore.

Each group's YAML lists its schema first in its defaults (`- _schema`, `- _schema_solo`, …), and `config.yaml` lists
`_run_schema`, so Hydra composes onto typed nodes: a value of the wrong type (`sampler.steps=abc`), a choice that is
not one (`intervention.site=projektor`) or a key that does not exist (`intervention.slott=3`) fails during
composition, naming the key — before any of our code runs, for every launcher and sweeper. A node composition did not
type (an entry of `interventions: [...]`, a metric added with `+metrics.x={_target_: …}`, a batched config) is typed
at planning by its `_target_` (`check_types`), with the same errors. `composition_error` turns OmegaConf's message
into the project's one line (key, problem, fix, did you mean).

The runtime classes (`ModelVariant`, `Sampler`, `PromptSet`, `WandbConfig`, each intervention and metric) subclass
these dataclasses, so a field is declared once; what types cannot say (ranges, vector lengths, files, one of slot or
layer) the classes check. This module imports no torch: `--help` and config errors stay instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, is_dataclass, make_dataclass
from dataclasses import fields as dataclass_fields
from functools import cache
from enum import StrEnum
from types import UnionType
from typing import Any, Callable, Optional, Union, get_args, get_origin

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


class ApplyTo(StrEnum):
    """The CFG branch an intervention edits."""

    cond = "cond"
    uncond = "uncond"
    both = "both"


class GainSite(StrEnum):
    """Where a gain vector acts (solo, leave_one_out): the weight, its inputs, the taps, or as a key mask."""

    projector = "projector"
    slots = "slots"
    taps = "taps"
    fusion_attention = "fusion_attention"


class RebalanceSite(StrEnum):
    """Where rebalance's gains act (a key mask can only hide or keep, so not `fusion_attention`)."""

    projector = "projector"
    slots = "slots"
    taps = "taps"


class StateSite(StrEnum):
    """The sites that hold states (steer, patch): `sites.SITES` of form `states`."""

    taps = "taps"
    slots = "slots"
    block = "block"
    fused = "fused"


class SteerSite(StrEnum):
    """Where steer acts: the text path's state sites, and the DiT's text tokens (`dit_text`, txt_in's output)."""

    taps = "taps"
    slots = "slots"
    block = "block"
    fused = "fused"
    dit_text = "dit_text"


class SlotStateSite(StrEnum):
    """The sites whose states have the 12-slot axis (ablate)."""

    taps = "taps"
    slots = "slots"
    block = "block"


class Renorm(StrEnum):
    none = "none"
    rms = "rms"


class Preset(StrEnum):
    """`interventions.projector.PRESETS`."""

    uniform = "uniform"
    deep_boost = "deep_boost"


class AblateMode(StrEnum):
    zero = "zero"
    mean = "mean"
    resample = "resample"
    noise = "noise"


class SteerMode(StrEnum):
    amplify = "amplify"
    add = "add"
    subtract = "subtract"
    project_out = "project_out"
    clamp = "clamp"


class Normalize(StrEnum):
    whole = "whole"
    per_tap = "per_tap"


# A slot or tap is an index (`6`) or an encoder layer (`L20`): `interventions.sites.slot_index` reads both.
Slot = Union[int, str]


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


# ---------------------------------------------------------------------------------------------- intervention
@dataclass
class InterventionFields:
    """Every intervention's gates: the CFG branch (`apply_to`) and the denoising-step window `steps` [start, end)."""

    apply_to: ApplyTo = ApplyTo.cond
    steps: Optional[list[int]] = None


@dataclass
class LayerGainsFields(InterventionFields):
    site: GainSite = GainSite.projector
    strength: float = 1.0


@dataclass
class SoloFields(LayerGainsFields):
    slot: Optional[Slot] = None
    layer: Optional[int] = None
    solo_gain: float = 1.0


@dataclass
class LeaveOneOutFields(LayerGainsFields):
    slot: Optional[Slot] = None
    layer: Optional[int] = None


@dataclass
class RebalanceFields(LayerGainsFields):
    site: RebalanceSite = RebalanceSite.projector
    preset: Optional[Preset] = Preset.deep_boost
    gains: Optional[list[float]] = None
    renorm: Renorm = Renorm.none


@dataclass
class LoraFileFields(InterventionFields):
    path: Optional[str] = None
    strength: float = 1.0


@dataclass
class TapScaleFields(InterventionFields):
    gains: Optional[list[float]] = None
    multiplier: float = 1.0
    renorm: Renorm = Renorm.none


@dataclass
class AblateFields(InterventionFields):
    site: SlotStateSite = SlotStateSite.taps
    mode: AblateMode = AblateMode.zero
    targets: list[Slot] = field(default_factory=list)
    reference_prompts: list[str] = field(default_factory=lambda: [
        "a photograph of a room", "a portrait of a person outdoors", "a painting of a landscape",
        "a close-up of an object on a table"])
    source_prompt: str = "a plain grey background"
    seed: int = 0


@dataclass
class KnockoutFields(InterventionFields):
    keys: Optional[list[Slot]] = None
    queries: Optional[list[Slot]] = None
    blocks: Optional[list[int]] = None


@dataclass
class SteerFields(InterventionFields):
    site: SteerSite = SteerSite.taps
    mode: SteerMode = SteerMode.amplify
    strength: float = 1.0
    value: float = 0.0
    pairs: Optional[list[list[str]]] = None
    direction_file: Optional[str] = None
    normalize: Normalize = Normalize.whole


@dataclass
class LensFields(InterventionFields):
    layer: Optional[int] = None
    tap: Optional[Slot] = None


@dataclass
class PatchFields(InterventionFields):
    pairs: list[list[str]] = field(default_factory=list)
    site: StateSite = StateSite.slots
    slots: Any = None  # null (all 12), one slot (`6`, `L20`) or a list of them: OmegaConf has no list-or-scalar type
    tokens: Optional[list[int]] = None
    block: int = 0


# --------------------------------------------------------------------------------------------------------- metrics
@dataclass
class NoFields:
    """A metric without settings: its schema still refuses a key it does not have."""


@dataclass
class ProjectorWeightsFields:
    reference: Optional[Base] = None  # the DiT weights whose stock projector to compare with
    reference_path: Optional[str] = None  # its checkpoint when the job runs a real model (synthetic: derived)


@dataclass
class FusionAttentionFields:
    save_probs: bool = True  # the full [content tokens, heads, 12, 12] per block, all prompts concatenated


@dataclass
class RefinerAttentionFields:
    window: int = 8  # ± valid-token ranks counted as "local"


@dataclass
class ClipScoreFields:
    path: Optional[str] = None


@dataclass
class RestorationFields:
    images: bool = True  # image restoration (generates A's stock images); false: conditioning only
    grid: bool = True  # the tracing heatmap: every single (slot, token) patch, conditioning restoration


@dataclass
class AttributionFields:
    compare: bool = True  # also run the true single patches and report the correlation


@dataclass
class ConceptMapsFields:
    concepts: list[str] = field(default_factory=lambda: ["woman", "flowers", "sky", "background"])
    blocks: Optional[list[int]] = None
    steps: Optional[list[int]] = None
    upsample: bool = True


@dataclass
class WordMapsFields:
    blocks: Optional[list[int]] = None  # DiT block indices; null = all
    steps: Optional[list[int]] = None  # denoising step indices; null = all
    compare_stock: bool = True  # correlation / IoU vs the stock run of the same prompt × seed
    upsample: bool = True  # also save [words, H, W] at image resolution
    chunk: int = 256  # image queries per logits chunk (memory: heads × chunk × sequence floats)


# ------------------------------------------------------------------------------------------------ top-level keys
@dataclass
class SweepFields:
    batch_axes: list[str] = field(default_factory=list)
    batch_grid: Optional[str] = None  # JSON [[axis, [values]], …], set by the sweeper for a batched job
    launcher_needs: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RunFields:
    """The top-level keys of `config.yaml` (no runtime class: `plan` reads them)."""

    name: str = "default"
    seeds: Any = field(default_factory=lambda: [0])  # a list of ints, or one int per job of a sweep (`-m seeds=0,1`)
    interventions: list[Any] = field(default_factory=list)  # of several classes: typed at planning by `_target_`
    conditioning_only: bool = False
    force: bool = False
    fail_fast: bool = False
    objective: Optional[str] = None
    headline: list[str] = field(default_factory=list)
    report: list[Any] = field(default_factory=list)  # panels of several classes (report.py), checked when built
    figures: Union[bool, str] = "auto"  # true | false | auto: OmegaConf has no bool-or-choice type (plan checks it)
    torch_threads: Union[int, str] = "auto"  # a count, or auto (process.torch_threads_for)
    sweep: SweepFields = field(default_factory=SweepFields)


def open_node(fields: type):
    """The typed nodes of `fields` in an open mapping: the root config also holds the groups and keys a preset adds
    (`concept`, `search`), which a closed schema would refuse; each listed key keeps its type."""
    from omegaconf import OmegaConf

    typed = OmegaConf.structured(fields)
    node = OmegaConf.create({})
    for name in typed:
        node[name] = typed._get_node(name)
    return node


def schema(fields: type, target: str) -> type:
    """`fields` plus the `_target_` Hydra instantiates (a user's own subclass may replace it; `build` checks it).
    Made at import and named in this module: a launcher that pickles a composed config (submitit, Ray) unpickles
    its typed nodes by importing their class from here."""
    name = f"{fields.__name__.removesuffix('Fields')}Schema"
    made = make_dataclass(name, [("_target_", str, field(default=target))], bases=(fields,))
    made.__module__ = __name__
    globals()[name] = made
    return made


def metric_schema(fields: type, target: str, name: str) -> tuple[str, type]:
    """(metric name, schema): the `metrics` group maps names to metrics, so the schema goes under the name; the
    schema class is named after the metric's class (`WordMapsSchema`, `ImageStatsSchema`), not the shared `NoFields`."""
    made = schema(make_dataclass(target.rsplit(".", 1)[1] + "Fields", [], bases=(fields,)), target)
    return name, made


_INTERVENTIONS = "krea_sweeps.interventions."
_METRICS = "krea_sweeps.metrics."

# (group, schema name in the group, schema): each group's YAML lists its schema name first in its defaults.
SCHEMAS = (
    ("model", "_schema", schema(VariantFields, "krea_sweeps.models.ModelVariant")),
    ("sampler", "_schema", schema(SamplerFields, "krea_sweeps.sampler.Sampler")),
    ("prompts", "_schema", schema(PromptSetFields, "krea_sweeps.prompts.PromptSet")),
    ("prompts", "_schema_file", schema(PromptFileFields, "krea_sweeps.prompts.PromptFile")),
    ("wandb", "_schema", schema(WandbFields, "krea_sweeps.tracking.WandbConfig")),
    ("intervention", "_schema_none", schema(InterventionFields, _INTERVENTIONS + "NoIntervention")),
    ("intervention", "_schema_solo", schema(SoloFields, _INTERVENTIONS + "Solo")),
    ("intervention", "_schema_leave_one_out", schema(LeaveOneOutFields, _INTERVENTIONS + "LeaveOneOut")),
    ("intervention", "_schema_rebalance", schema(RebalanceFields, _INTERVENTIONS + "Rebalance")),
    ("intervention", "_schema_lora_file", schema(LoraFileFields, _INTERVENTIONS + "LoraFile")),
    ("intervention", "_schema_tap_scale", schema(TapScaleFields, _INTERVENTIONS + "TapScale")),
    ("intervention", "_schema_ablate", schema(AblateFields, _INTERVENTIONS + "Ablate")),
    ("intervention", "_schema_knockout", schema(KnockoutFields, _INTERVENTIONS + "Knockout")),
    ("intervention", "_schema_steer", schema(SteerFields, _INTERVENTIONS + "Steer")),
    ("intervention", "_schema_lens", schema(LensFields, _INTERVENTIONS + "Lens")),
    ("intervention", "_schema_patch", schema(PatchFields, _INTERVENTIONS + "Patch")),
)

# (metric name, schema): `conf/metrics/<name>.yaml` lists `_schema_<name>` first; the node is {name: schema}.
METRIC_SCHEMAS = (
    metric_schema(AttributionFields, _METRICS + "tracing.Attribution", "attribution"),
    metric_schema(ClipScoreFields, _METRICS + "image.ClipScore", "clip_score"),
    metric_schema(ConceptMapsFields, _METRICS + "concept_maps.ConceptMaps", "concept_maps"),
    metric_schema(NoFields, _METRICS + "conditioning.CondShift", "cond_shift"),
    metric_schema(NoFields, _METRICS + "image.Diversity", "diversity"),
    metric_schema(FusionAttentionFields, _METRICS + "conditioning.FusionAttention", "fusion_attention"),
    metric_schema(NoFields, _METRICS + "image.ImageDistance", "image_distance"),
    metric_schema(NoFields, _METRICS + "image.ImageStats", "image_stats"),
    metric_schema(ProjectorWeightsFields, _METRICS + "conditioning.ProjectorWeights", "projector"),
    metric_schema(RefinerAttentionFields, _METRICS + "conditioning.RefinerAttention", "refiner_attention"),
    metric_schema(RestorationFields, _METRICS + "tracing.Restoration", "restoration"),
    metric_schema(NoFields, _METRICS + "conditioning.SlotContribution", "slot_contribution"),
    metric_schema(NoFields, _METRICS + "conditioning.TapNorms", "tap_norms"),
    metric_schema(WordMapsFields, _METRICS + "word_maps.WordMaps", "word_maps"),
)


def register_schemas() -> None:
    """Put each group's schema, and the top-level keys' (`_run_schema`), in Hydra's ConfigStore (idempotent): call
    before composing."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        store.store(group=group, name=name, node=node)
    for name, node in METRIC_SCHEMAS:
        store.store(group="metrics", name=f"_schema_{name}", node={name: node})
    store.store(name="_run_schema", node=open_node(RunFields))


def fields_class(obj: Any) -> type | None:
    """The dataclass of this module that `obj`'s class takes its config fields from (None: no schema, e.g. a metric
    without settings)."""
    return next((c for c in type(obj).__mro__ if c.__module__ == __name__ and is_dataclass(c)), None)


@cache
def _empty(fields: type):
    from omegaconf import OmegaConf

    return OmegaConf.structured(fields)


@cache
def _hints(fields: type) -> dict[str, Any]:
    from typing import get_type_hints

    return get_type_hints(fields)


_NO = object()


def _union_members(hint: Any) -> tuple:
    """The types of `Optional[X]` / `X | Y | None` (empty for anything else, `list[int]` included)."""
    return get_args(hint) if get_origin(hint) in (Union, UnionType) else ()


def _plain_value(hint: Any, value: Any) -> Any:
    """`value` as composition would type it for `hint`, for the plain cases only (a number, a text, a flag, a choice
    given as its text, null where allowed); `_NO` for anything else, which then goes through OmegaConf itself."""
    if value is None:
        return None if hint is Any or type(None) in _union_members(hint) else _NO
    for option in [a for a in _union_members(hint) if a is not type(None)] or [hint]:
        if get_origin(option) is not None:  # list[int], dict[…]: containers go through OmegaConf
            return _NO
        kind = type(value)
        if option is Any and kind in (int, float, str, bool):
            return value
        if option is float and kind in (int, float):
            return float(value)
        if option in (int, str, bool) and kind is option:
            return value
        if isinstance(option, type) and issubclass(option, StrEnum):
            if isinstance(value, option):  # a default: OmegaConf hands a choice back as its name
                return value.name
            if kind is str and value in option.__members__:
                return value
    return _NO


def _plain_values(fields: type, values: dict[str, Any]) -> dict[str, Any] | None:
    """Every value typed by `_plain_value` (the common case: values from a composed config or a batched axis), or
    None when one needs OmegaConf's own merge. The same result as the merge for these cases (tested), at a
    hundredth of its cost: a batch of thousands of configs builds thousands of interventions."""
    hints, out = _hints(fields), {}
    for name, value in values.items():
        hint = hints.get(name, Any)
        members = _union_members(hint)  # NoneType among them where null is allowed
        if len(set(members) - {type(None)}) > 1:  # a union of plain types (OmegaConf allows no others): only an
            typed = value if type(value) in members else _NO  # exact type is kept as is
        else:
            typed = _plain_value(hint, value)
        if typed is _NO:
            return None
        out[name] = typed
    return out


def check_instance(obj: Any, key: str) -> None:
    """`obj`'s config fields checked and converted as composition does (`strength: "0.5"` → 0.5; a choice stays its
    plain text), one line naming `key.<field>` otherwise: an object built in Python — a notebook, a test, an
    entry of `interventions: [...]` (which composition does not type), a batched config — gets the same errors and
    values as the command line. A user subclass's own extra fields are its own to check."""
    from omegaconf import OmegaConf

    fields = fields_class(obj)
    if fields is None:
        return
    values = {f.name: getattr(obj, f.name) for f in dataclass_fields(fields)}
    plain = _plain_values(fields, values)
    if plain is not None:
        for name, value in plain.items():
            setattr(obj, name, value)
        return
    try:
        typed = OmegaConf.to_container(OmegaConf.merge(_empty(fields), values), enum_to_str=True)
    except Exception as e:
        error = composition_error(e, lambda: list(values))
        if error is None:
            raise ConfigError(key, str(e).splitlines()[0], f"check the `{key}` values") from None
        raise ConfigError(f"{key}.{error.key}", error.problem, error.fix) from None
    for name, value in typed.items():
        setattr(obj, name, value)


# ------------------------------------------------------------------------------------------------ one-line errors
_FULL_KEY = re.compile(r"full_key: (\S+)")
_OVERRIDE_KEY = re.compile(r"Error merging override [+~]*([^=\s]+)=")
_NOT_CONVERTED = re.compile(r"Value '(.*)' (?:of type '\w+' could not be converted to (\w+)|is not a valid (bool))")
_NOT_IN_UNION = re.compile(r"Value '(.*)' of type '\w+' is incompatible with type hint '(.*)'")
_NOT_A_CONTAINER = re.compile(r"Invalid value assigned: (\w+) is not a (ListConfig|DictConfig)")
_NOT_A_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")
_NO_KEY = re.compile(r"Key '([^']+)' not in '\w+'|Could not override '([^']+)'|Key '([^']+)' is not in struct")
_TYPE_WORDS = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false", "String": "text"}
_HINT_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def composition_error(error: BaseException, keys: Callable[[], list[str]] | None = None) -> ConfigError | None:
    """Hydra's composition error as one ConfigError naming the key, or None when it is not about one key's value or
    name (the caller reports it its own way). `keys()`: every key of the config, for "did you mean" on a misspelt
    key (asked only then: it composes again)."""
    text = _chain_text(error)
    found, override = _FULL_KEY.search(text), _OVERRIDE_KEY.search(text)
    key = found.group(1) if found else None
    if override and (key is None or not key.startswith(override.group(1))):  # a key inside a value (`pairs[0]`)
        key = override.group(1)
    show = "(`python run.py --cfg job` shows the current value)"
    if (m := _NOT_CONVERTED.search(text)) and key:
        value, kind = m.group(1), {"bool": "Boolean"}.get(m.group(3), m.group(2))
        return ConfigError(key, f"{value!r} is not {_TYPE_WORDS.get(kind, kind)}",
                           f"give {_TYPE_WORDS.get(kind, kind)} {show}")
    if (m := _NOT_IN_UNION.search(text)) and key:
        words = " or ".join(_HINT_WORDS[t] for t in re.findall(r"\b(int|float|bool|str)\b", m.group(2)))
        return ConfigError(key, f"{m.group(1)!r} is not {words}", f"give {words} {show}")
    if (m := _NOT_A_CONTAINER.search(text)) and key:
        kind = "a list" if m.group(2) == "ListConfig" else "a mapping"
        return ConfigError(key, f"a single {m.group(1)} where {kind} is expected",
                           f"give {kind}, e.g. {key}={'[…]' if kind == 'a list' else '{…}'} {show}")
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
