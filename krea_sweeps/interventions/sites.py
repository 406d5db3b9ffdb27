"""Where interventions act on Krea 2's text path — the site registry — and how slots/taps are addressed.

Each site is declared once, in `SITES` (diffusers 0.42.1 module names, under `transformer.text_fusion`): how to find
its module, which hook (forward-pre or forward), what form of op it takes, and its tensor layout. Ops see states in
one canonical layout — tokens first, the slot axis second to last: [B, T, 12, D] (or [B, T, D] where there are no
slots) — and the site converts to and from its own, so an op is written once for every site that accepts it.

- `taps` (states): the 12 stacked encoder hidden states entering `text_fusion` [B, T, 12, D] (pre-hook on it);
- `slots` (states): the attention-mixed projector inputs [B, T, D, 12] (pre-hook on `text_fusion.projector`);
- `block` (states, per layerwise block): one layerwise block's output [B·T, 12, D] (forward hook);
- `fused` (states, no slot axis): the text features after the refiner blocks [B, T, D] (forward hook on
  `text_fusion`);
- `projector` (weight): the [1, 12] weight, edited at forward time (a forward hook returning `F.linear(x, w')`,
  bit-identical to replacing the weight, but gated per CFG branch and step, and nothing is written);
- `fusion_attention` (key_mask or processor, per layerwise block): the layerwise blocks' cross-layer attention
  (pre-hook on `layerwise_blocks[i].attn` injecting a key mask; or its processor wrapped, for probes);
- `refiner_attention` (processor, per refiner block): the refiner blocks' attention over the tokens;
- `dit_text` (states, per token, DiT width): the DiT's text tokens as its joint blocks receive them — the output of
  `txt_in` [B, T, D_dit] (forward hook);
- `dit_attention` (processor, per DiT block): the joint [text; image] attention of `transformer_blocks[i]` (its
  processor wrapped: the word-map and concept-map probes, and any op that edits attention).

A new site is one more `Site(...)` passed to `register_site`. A slot or tap is addressed by index (`3`) or by its encoder layer (`L20` in lists, or `layer: 20`):
layer 20 is index 6 because select_layers = [2, 5, ..., 35]; `slot_index`/`layer_of` are the one conversion.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..errors import ConfigError, require
from ..synthetic import SELECT_LAYERS

NUM_SLOTS = len(SELECT_LAYERS)
NUM_LAYERWISE_BLOCKS = 2  # Krea 2 (and the synthetic model): `num_layerwise_text_blocks`


# ---------------------------------------------------------------------------------------------------- addressing
def layer_of(slot: int) -> int:
    return SELECT_LAYERS[slot]


def slot_of_layer(layer: Any, key: str) -> int:
    try:
        layer = int(layer)
    except (TypeError, ValueError):
        raise ConfigError(key, f"{layer!r} is not a layer number", f"give one of {list(SELECT_LAYERS)}") from None
    require(layer in SELECT_LAYERS, key, f"layer {layer} is not tapped by Krea 2",
            f"use one of select_layers {list(SELECT_LAYERS)} (or a slot index 0–{NUM_SLOTS - 1})")
    return SELECT_LAYERS.index(layer)


def slot_index(value: Any, key: str) -> int:
    """`3` → 3 (slot index); `"L20"` → 6 (encoder layer 20)."""
    if isinstance(value, str) and value.strip()[:1] in ("L", "l"):
        return slot_of_layer(value.strip()[1:], key)
    if isinstance(value, bool) or value is None:
        raise ConfigError(key, f"{value!r} is not a slot", f"give an index 0–{NUM_SLOTS - 1} or a layer like L20")
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"{value!r} is not a slot", f"give an index 0–{NUM_SLOTS - 1} or a layer like L20") \
            from None
    require(0 <= index < NUM_SLOTS and float(value) == index, key, f"slot {value} is out of range",
            f"give an index 0–{NUM_SLOTS - 1} or a layer like L20 (select_layers {list(SELECT_LAYERS)})")
    return index


def slot_indices(values: Iterable[Any] | None, key: str) -> list[int]:
    if values is None:
        return []
    if isinstance(values, (int, str)):
        values = [values]
    out = [slot_index(v, f"{key}[{i}]") for i, v in enumerate(values)]
    require(len(set(out)) == len(out), key, f"{list(values)} names a slot twice", "list each slot once")
    return sorted(out)


def resolve_slot(slot: Any, layer: Any, key: str) -> tuple[int, int]:
    """(slot, layer) from either one; both given must agree."""
    require(slot is not None or layer is not None, f"{key}.slot", "no slot given",
            f"set {key}.slot=0..{NUM_SLOTS - 1} (or {key}.layer=20)")
    index = slot_index(slot, f"{key}.slot") if slot is not None else slot_of_layer(layer, f"{key}.layer")
    if slot is not None and layer is not None:
        require(slot_of_layer(layer, f"{key}.layer") == index, f"{key}.layer",
                f"layer {layer} is not slot {slot} (slot {slot} is layer {layer_of(index)})", "give only one of them")
    return index, layer_of(index)


def gains_vector(values: Any, key: str) -> list[float]:
    require(values is not None and not isinstance(values, (str, int, float)) and len(values) == NUM_SLOTS, key,
            f"{values!r} is not {NUM_SLOTS} gains", f"give one gain per slot, {NUM_SLOTS} numbers")
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ConfigError(key, f"{v!r} is not a number", "give numeric gains") from None
    finite(out, key)
    return out


def finite(values: Any, key: str) -> None:
    for v in values if isinstance(values, (list, tuple)) else [values]:
        require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), key,
                f"{v!r} is not a finite number", "give finite numbers (no NaN or inf)")


def block_indices(values: list[int] | None, key: str) -> list[int]:
    """Layerwise block indices (null = all of Krea 2's two); a list of ints (typed: `configs.KnockoutFields`)."""
    if values is None:
        return list(range(NUM_LAYERWISE_BLOCKS))
    for v in values:
        require(0 <= v < NUM_LAYERWISE_BLOCKS, key, f"{v!r} is not a layerwise block",
                f"give indices 0–{NUM_LAYERWISE_BLOCKS - 1} (or null for all)")
    return sorted(set(values))



# ------------------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Layout:
    """How states are laid out at a site, and the conversion to and from the canonical [B, T, 12, D] / [B, T, D].
    `call` is the text_fusion call in progress (its taps give B, for layouts that fold the batch into the tokens)."""

    name: str
    has_slots: bool
    to_canonical: Callable[[Any, Any], Any]
    from_canonical: Callable[[Any, Any, Any], Any]  # (y, x as it came, call)


TOKENS_SLOTS_DIM = Layout("[B, T, 12, D]", True, lambda x, call: x, lambda y, x, call: y)
TOKENS_DIM_SLOTS = Layout("[B, T, D, 12]", True, lambda x, call: x.transpose(-1, -2),
                          lambda y, x, call: y.transpose(-1, -2))
FOLDED_TOKENS = Layout("[B·T, 12, D]", True, lambda x, call: x.reshape(call.batch, -1, *x.shape[1:]),
                       lambda y, x, call: y.reshape(x.shape))
TOKENS = Layout("[B, T, D]", False, lambda x, call: x, lambda y, x, call: y)


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Site:
    """One place an op can act: `module(ctx, index)` finds it from the `InterventionContext` (the text path's
    modules, or the transformer's for DiT sites), `hook` is `pre` (the module's first input), `forward` (its output)
    or `processor` (the attention module's processor, wrapped), `form` is what an op must provide there (`states`,
    `weight`, `key_mask` or `processor`; a tuple when the site takes several), `layout` how states look there (None
    for the other forms). `count(ctx)`: how many indexed modules the site has (None: one; per-block sites default to
    all of them). `run(ctx, taps, mask)`: what makes the site's module run from encoded prompts without the DiT
    blocks (what `capture` calls; None: the text path). `width`: `text` (the encoder's D) or `dit` (the DiT's
    hidden size). `addressing` says in words how an op picks where it acts there (the docs' table)."""

    name: str
    module: Callable[[Any, int], Any]
    hook: str
    form: str | tuple[str, ...]
    layout: Layout | None = None
    count: Callable[[Any], int] | None = None
    run: Callable[[Any, Any, Any], Any] | None = None
    width: str = "text"
    addressing: str = ""
    doc: str = ""

    @property
    def forms(self) -> tuple[str, ...]:
        return (self.form,) if isinstance(self.form, str) else tuple(self.form)

    @property
    def per_block(self) -> bool:
        return self.count is not None

    @property
    def has_slots(self) -> bool:
        return self.layout is None or self.layout.has_slots


def _indexed(modules, index: int, what: str):
    require(0 <= index < len(modules), "intervention.blocks", f"{what} {index} does not exist (the model has "
            f"{len(modules)})", f"give indices 0–{len(modules) - 1}")
    return modules[index]


def _block(ctx, index: int):
    return _indexed(text_fusion(ctx).layerwise_blocks, index, "layerwise block")


def _refiner(ctx, index: int):
    return _indexed(text_fusion(ctx).refiner_blocks, index, "refiner block")


def _dit_block(ctx, index: int):
    return _indexed(transformer(ctx).transformer_blocks, index, "DiT block")


def _through_txt_in(ctx, taps, mask):
    """The DiT's text tokens for encoded prompts: text_fusion then txt_in, as `Krea2Transformer2DModel.forward`."""
    return ctx.text_path.txt_in(ctx.text_path(taps, mask))


SITES: dict[str, Site] = {}


def register_site(site: Site) -> Site:
    """Declare a site (once: a second declaration under the same name is a programming error)."""
    if site.name in SITES:
        raise ValueError(f"site {site.name!r} is already declared")
    SITES[site.name] = site
    return site


def _layerwise_count(ctx) -> int:
    return len(text_fusion(ctx).layerwise_blocks)


register_site(Site("taps", lambda ctx, i: text_fusion(ctx), "pre", "states", TOKENS_SLOTS_DIM,
                   addressing="slot (tap) index or encoder layer; tokens", doc="the 12 encoder hidden states "
                   "entering text_fusion"))
register_site(Site("slots", lambda ctx, i: text_fusion(ctx).projector, "pre", "states", TOKENS_DIM_SLOTS,
                   addressing="slot index or encoder layer; tokens",
                   doc="the projector's inputs, after the layerwise blocks"))
register_site(Site("projector", lambda ctx, i: text_fusion(ctx).projector, "forward", "weight",
                   addressing="the weight's 12 entries (one per slot)",
                   doc="the [1, 12] projector weight, applied at call time"))
register_site(Site("fusion_attention", lambda ctx, i: _block(ctx, i).attn, "pre", ("key_mask", "processor"),
                   count=_layerwise_count, addressing="layerwise block index; keys = slots",
                   doc="the layerwise blocks' attention over the 12 slots"))
register_site(Site("block", _block, "forward", "states", FOLDED_TOKENS, count=_layerwise_count,
                   addressing="layerwise block index; slots; tokens", doc="one layerwise block's output"))
register_site(Site("fused", lambda ctx, i: text_fusion(ctx), "forward", "states", TOKENS,
                   addressing="tokens", doc="the text features after the refiner blocks"))
register_site(Site("refiner_attention", lambda ctx, i: _refiner(ctx, i).attn, "processor", "processor",
                   count=lambda ctx: len(text_fusion(ctx).refiner_blocks), addressing="refiner block index",
                   doc="the refiner blocks' attention over the text tokens"))
register_site(Site("dit_text", lambda ctx, i: ctx.text_path.txt_in, "forward", "states", TOKENS,
                   run=_through_txt_in, width="dit", addressing="tokens (no slot axis)",
                   doc="the DiT's text tokens: txt_in's output, what the joint blocks receive"))
register_site(Site("dit_attention", lambda ctx, i: _dit_block(ctx, i).attn, "processor", "processor",
                   count=lambda ctx: len(transformer(ctx).transformer_blocks), width="dit",
                   addressing="DiT block index; queries/keys = [text; image] tokens",
                   doc="the joint [text; image] attention of a DiT block"))

# ------------------------------------------------------------------------------------------------------- modules
def text_fusion(ctx) -> Any:
    require(ctx.text_path is not None, "intervention", "attached without a text path",
            "attach through JobContext.intervened() or pass InterventionContext(text_path=...)")
    return ctx.text_path.text_fusion


def projector(ctx) -> Any:
    return text_fusion(ctx).projector


def transformer(ctx) -> Any:
    if ctx.transformer is None and ctx.get_transformer is not None:
        ctx.transformer = ctx.get_transformer()
    require(ctx.transformer is not None, "intervention.site", "a DiT site was attached without the transformer",
            "use it in a job that generates images, or pass InterventionContext(transformer=...)")
    return ctx.transformer


# --------------------------------------------------------------------------------------------------------- hooks
@contextmanager
def hooked(module, fn, *, pre: bool = False, with_kwargs: bool = False) -> Iterator[None]:
    """Register one forward(-pre) hook for the body only: `handle.remove()` runs also when the body raises."""
    if pre:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    else:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


def replace_first_arg(args: tuple, value) -> tuple:
    return (value, *args[1:])


def pool_tokens(x, mask):
    """Mean over valid tokens: x [B, T, ...], mask [B, T] bool → [B, ...]."""
    m = mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.dim() - 2)))
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


# --------------------------------------------------------------------------------------------- rows → prompts
ENCODER_LAYERS = 36  # Qwen3-VL's decoder layers (real and synthetic): hidden states 0 (embeddings) … 36


def fusion_mask(args: tuple, kwargs: dict):
    """text_fusion's token mask [B, T] bool from its call (None: every token valid, e.g. the trimmed fast path)."""
    m = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return None if m is None else m.reshape(m.shape[0], m.shape[-1]).bool()


def valid_columns(mask, b: int, length: int, device):
    import torch

    return torch.ones(length, dtype=torch.bool, device=device) if mask is None else mask[b].to(device)


class PromptRows:
    """Which known prompt each row of a text_fusion input holds, found by its valid tokens' taps (bit-equal).

    A hook on text_fusion sees tensors, not prompts: the pipeline repeats a prompt's taps per seed, the fast path
    trims the padding, conditioning metrics batch prompts. Matching the valid tokens' taps identifies the prompt in
    all of these (identical prompts have identical taps, so which one matches does not matter)."""

    def __init__(self, encoded):
        self.valid = [encoded.taps[i][encoded.mask[i].bool()] for i in range(encoded.taps.shape[0])]
        self.content = [encoded.content[i][encoded.mask[i].bool()] for i in range(encoded.taps.shape[0])]

    def find(self, x, mask) -> list[int | None]:
        import torch

        out = []
        for b in range(x.shape[0]):
            xv = x[b, valid_columns(mask, b, x.shape[1], x.device)]
            hit = None
            for i, cand in enumerate(self.valid):
                if cand.shape == xv.shape and torch.equal(cand.to(xv.device), xv):
                    hit = i
                    break
            out.append(hit)
        return out
