"""Per-slot gains on Krea 2's projector (`text_fusion.projector`, Linear(12 → 1)): solo, leave-one-out, rebalance,
and the seed's `.diff` LoRA files.

The model card's semantics: gains g (one per slot), strength s, effective weight w' = w ⊙ (1 + s(g − 1)); s = 1 and
g = e_k keep the learned w_k and zero the other 11 (a "solo" probe). The same multiplier can act at other sites, which
give *different* outputs, so the site is always recorded:
- `projector`: a forward hook returns `F.linear(x, w')` — bit-identical to replacing the weight, but computed at call
  time, so it can be gated to the positive CFG branch and a step window, and nothing is ever written to the weight.
  Several projector edits compose in list order on the weight, w' = f_n(…f_1(w)) (rebalance g then h = rebalance
  g ⊙ h; solo then lora_file = w_k·e_k + s·diff), through one shared hook; `renorm: rms` rescales the composed
  output to the stock output's RMS;
- `slots`: the projector's inputs are scaled (equal to `projector` up to float rounding — a check, not a new lever);
- `taps`: the encoder states entering text_fusion are scaled (solo = zero the other taps' inputs);
- `fusion_attention` (0/1 multipliers only): keys with multiplier 0 are hidden in the layerwise attention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..configs import LayerGainsFields, LeaveOneOutFields, LoraFileFields, RebalanceFields, SoloFields
from ..errors import ConfigError, require
from .attention import key_mask
from .base import Intervention
from .hooks import Op
from .installers import projector_hook, rms_like  # noqa: F401 - the projector site's installer
from .sites import NUM_SLOTS, finite, gains_vector, resolve_slot

DIFF_KEY = "diffusion_model.txtfusion.projector.diff"  # ComfyUI's `.diff` patch: weight += strength · diff
PRESETS = {
    "uniform": [1.0] * NUM_SLOTS,
    "deep_boost": [1, 1, 1, 1, 1, 1, 1, 2.5, 5.0, 1.1, 4.0, 1.0],
}


class Gains(Op):
    """Per-slot multipliers m: on the projector weight (w ⊙ m, in float32 and cast back, as ComfyUI patches bf16
    weights), on states with a slot axis (each slot × its multiplier; `renorm` then rescales each token's 12-slot
    stack to its stock RMS), or — 0/1 multipliers only — as a key mask of the layerwise attention (0 = hidden)."""

    name = "gains"
    needs_slots = True

    def __init__(self, multipliers: list[float], renorm: bool = False):
        self.multipliers, self.renorm = list(multipliers), renorm

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.multipliers, dtype=torch.float32, device=w.device)
        return (w.float() * m).to(w.dtype)

    def states(self, x: torch.Tensor, call) -> torch.Tensor:
        y = x * torch.tensor(self.multipliers, dtype=x.dtype, device=x.device)[:, None]
        return rms_like(y.flatten(-2), x.flatten(-2), dim=-1).view_as(x) if self.renorm else y

    def key_mask(self) -> torch.Tensor:
        return key_mask([m != 0.0 for m in self.multipliers])

    def refusal(self, site) -> str | None:
        if "key_mask" in site.forms and not all(m in (0.0, 1.0) for m in self.multipliers):
            return (f"{site.name} can only hide or keep a key, but the multipliers are {self.multipliers} (use "
                    "strength 1 and solo_gain 1 there)")
        return super().refusal(site)


@dataclass
class LayerGains(LayerGainsFields, Intervention):
    """Base for gain-vector interventions: subclasses define `gain_vector()`; the op is `Gains` with multipliers
    1 + s(g − 1), at `site` (its choices are the field's type, `configs.GainSite`)."""

    def __post_init__(self):
        super().__post_init__()
        finite(self.strength, "intervention.strength")

    def gain_vector(self) -> list[float]:
        raise NotImplementedError

    def multipliers(self) -> list[float]:
        return [1.0 + self.strength * (g - 1.0) for g in self.gain_vector()]

    @property
    def rms_renorm(self) -> bool:
        return False

    def make_op(self) -> Op:
        return Gains(self.multipliers(), renorm=self.rms_renorm)

    @property
    def is_identity(self) -> bool:
        return all(m == 1.0 for m in self.multipliers())

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """w' = w ⊙ (1 + s(g − 1)), computed in float32 and cast back (as ComfyUI patches bf16 weights)."""
        return Gains(self.multipliers()).weight(weight)


@dataclass
class Solo(SoloFields, LayerGains):
    """The model card's probe: keep slot k (`slot: 6` or `layer: 20`), zero the other 11. g = solo_gain · e_k."""

    kind: ClassVar[str] = "solo"

    def __post_init__(self):
        super().__post_init__()
        self.slot, self.layer = resolve_slot(self.slot, self.layer, "intervention")
        finite(self.solo_gain, "intervention.solo_gain")
        self.check_site()

    def gain_vector(self) -> list[float]:
        return [self.solo_gain if i == self.slot else 0.0 for i in range(NUM_SLOTS)]


@dataclass
class LeaveOneOut(LeaveOneOutFields, LayerGains):
    """Drop slot k, keep the other 11: g = 1 − e_k."""

    kind: ClassVar[str] = "leave_one_out"

    def __post_init__(self):
        super().__post_init__()
        self.slot, self.layer = resolve_slot(self.slot, self.layer, "intervention")
        self.check_site()

    def gain_vector(self) -> list[float]:
        return [0.0 if i == self.slot else 1.0 for i in range(NUM_SLOTS)]


@dataclass
class Rebalance(RebalanceFields, LayerGains):
    """A 12-gain vector (or a `preset`: uniform, deep_boost) at a strength; `renorm: rms` rescales each fused token
    (projector output) to its stock RMS. Explicit `gains` replace the preset (recorded as preset=null)."""

    kind: ClassVar[str] = "rebalance"

    def __post_init__(self):
        super().__post_init__()
        require(self.renorm == "none" or self.site == "projector", "intervention.renorm",
                f"renorm=rms rescales the projector output, but site={self.site}", "use site=projector with renorm=rms")
        if self.gains is not None:
            self.gains = gains_vector(list(self.gains), "intervention.gains")
            self.preset = None
        else:
            require(self.preset is not None, "intervention.preset", "neither gains nor a preset given",
                    f"set intervention.preset ({', '.join(PRESETS)}) or intervention.gains=[12 numbers]")
            self.gains = [float(g) for g in PRESETS[self.preset]]
        self.check_site()

    @property
    def rms_renorm(self) -> bool:
        return self.renorm == "rms"

    def gain_vector(self) -> list[float]:
        return list(self.gains)


# ------------------------------------------------------------------------------------------- the seed's .diff files
def diff_of(weight: torch.Tensor, gains: list[float]) -> torch.Tensor:
    """The `.diff` patch for gains g: w ⊙ (g − 1), so that w + 1·diff = w ⊙ g (ComfyUI's LoraLoaderModelOnly)."""
    g = torch.tensor(gains, dtype=torch.float32).view(1, NUM_SLOTS)
    return (weight.detach().float().cpu().view(1, NUM_SLOTS) * (g - 1.0)).contiguous()


def read_diff_file(path: str | Path, key: str = "intervention.path") -> tuple[torch.Tensor, dict]:
    """The [1, 12] diff and the metadata of a seed-format file; anything else is a ConfigError."""
    from safetensors import SafetensorError, safe_open

    file = Path(path).expanduser()
    require(not file.is_dir(), key, f"{file} is a folder", "give one projector .diff .safetensors file inside it")
    require(file.is_file(), key, f"{file} does not exist", "give a projector .diff .safetensors file (krea-export writes them)")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys, metadata = list(f.keys()), dict(f.metadata() or {})
            tensor = f.get_tensor(DIFF_KEY) if DIFF_KEY in keys else None
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(key, f"{file} is not a safetensors file ({str(e).splitlines()[0]})",
                          "give a projector .diff .safetensors file") from None
    require(keys == [DIFF_KEY], key, f"{file.name} holds {keys}, not exactly one `{DIFF_KEY}`",
            "give a projector .diff file (one [1,12] tensor under that key)")
    require(tuple(tensor.shape) == (1, NUM_SLOTS), key,
            f"{file.name}: `{DIFF_KEY}` has shape {list(tensor.shape)}", f"the projector diff must be [1, {NUM_SLOTS}]")
    require(bool(torch.isfinite(tensor).all()), key, f"{file.name} holds NaN/inf", "re-export the file")
    return tensor.float(), metadata


CARD_METADATA = ("krea2_explorations", "isolate_band", "qwen_layer", "solo_gain")


def parse_gains(text: str | None) -> list[float] | None:
    """A file's `gains` metadata: ours is a JSON list, the model card toolkit's comma-separated text
    (`0,0,0,0,0,0,1,0,0,0,0,0`). Metadata is optional (the tensor is what is applied): unreadable gains are None."""
    if not text:
        return None
    try:
        value = json.loads(text)
        if isinstance(value, list):
            return [float(v) for v in value]
    except (ValueError, TypeError):
        pass
    try:
        return [float(v) for v in str(text).strip().strip("[]").split(",")]
    except ValueError:
        return None


class AddDiff(Op):
    """w' = w + s·diff (float32, cast back), as ComfyUI's LoRA loader applies a `.diff` patch."""

    name = "add_diff"

    def __init__(self, diff: torch.Tensor, strength: float):
        self.diff, self.strength = diff, strength

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return (w.float() + self.strength * self.diff.to(w.device)).to(w.dtype)


@dataclass
class LoraFile(LoraFileFields, Intervention):
    """A projector `.diff` file (the seed's format) at a strength: w' = w + s·diff, as ComfyUI's loader applies it."""

    kind: ClassVar[str] = "lora_file"

    def __post_init__(self):
        super().__post_init__()
        require(self.path is not None, "intervention.path", "no file given",
                "set intervention.path=/path/to/projector_solo_b06_L20.safetensors")
        finite(self.strength, "intervention.strength")
        self.diff, metadata = read_diff_file(self.path)
        self.file_gains = parse_gains(metadata.get("gains"))
        self.file_meta = {k: metadata[k] for k in ("kind", "preset") if k in metadata}
        self.file_meta.update({k: int(metadata[k]) for k in ("slot", "layer") if metadata.get(k, "").isdigit()})
        # The model card toolkit's own metadata (kept as text: it is a record, not an input).
        self.file_meta.update({k: metadata[k] for k in CARD_METADATA if k in metadata})

    @property
    def is_identity(self) -> bool:
        return self.strength == 0.0 or not bool(self.diff.any())

    @property
    def placement(self) -> tuple[str, None]:
        return "projector", None

    def make_op(self) -> Op:
        return AddDiff(self.diff, self.strength)

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.op.weight(weight)

    def describe(self) -> dict:
        out = super().describe()
        out.update(site="projector", file_gains=self.file_gains,
                   **{("file_kind" if k == "kind" else k): v for k, v in self.file_meta.items()})
        return out
