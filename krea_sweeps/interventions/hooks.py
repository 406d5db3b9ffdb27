"""Ops, and the one generic `attach` that installs any op at any site that accepts it, as named hooks.

An op is a pure function of (states, call, its parameters): `states(x, call)` maps canonical states ([B, T, 12, D],
or [B, T, D] where the site has no slots) to edited ones; `weight(w)` maps the projector weight to an edited one;
`key_mask()` gives the slots a layerwise attention may attend to; `processor(inner, index)` wraps an attention
module's processor (probes that read the attention a block used, edits of attention itself). An op provides one or
more of these forms, and a site (`sites.SITES`) takes one or more; the first form of the site's that the op provides
is installed. `call` is the text_fusion call in progress: `call.state` (CFG branch and
step), `call.taps`, `call.mask` (the token mask, None when every token is valid) and `call.batch`.

Gates (CFG branch, step window) are the intervention's `active(state)`; `attach` checks them on every call and
leaves the call untouched when inactive. Every hook is registered under a name in the context's `HookRegistry`
(the session's, for a job), so what is attached can be listed at any moment: `Session.attached()`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from ..errors import ConfigError, require_choice
from ..registry import AttachedOp, HookRegistry  # noqa: F401 - the session's registry of named hooks
from .installers import masked_attention, projector_hook
from .sites import SITES, Site, fusion_mask, hooked, replace_first_arg, text_fusion

FORMS = ("states", "weight", "key_mask", "processor")


class Op:
    """Base for ops. Subclasses override the forms they provide (`states`, `weight`, `key_mask`) and may narrow
    where they act: `needs_slots` (the op indexes the slot axis), `only_at` (a tuple of site names).
    `depends_on_step`: the op reads `call.state.step` itself (so the text path may not be reused across steps)."""

    name: ClassVar[str] = "op"
    needs_slots: ClassVar[bool] = False
    only_at: ClassVar[tuple[str, ...] | None] = None
    depends_on_step: ClassVar[bool] = False

    def states(self, x: torch.Tensor, call: "Call") -> torch.Tensor:
        raise NotImplementedError

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key_mask(self) -> torch.Tensor:
        raise NotImplementedError

    def processor(self, inner, index: int):
        """A processor to use instead of `inner` (the module's own) at block `index`: it must call `inner` for
        the output to stay the stock one where it only reads."""
        raise NotImplementedError

    renorm: bool = False  # weight form: rescale the edited projector output to the stock output's RMS

    @classmethod
    def forms(cls) -> tuple[str, ...]:
        return tuple(f for f in FORMS if getattr(cls, f) is not getattr(Op, f))

    def refusal(self, site: Site) -> str | None:
        """Why this op cannot act at `site` (None: it can)."""
        if not set(site.forms) & set(self.forms()):
            return f"{self.name} has no {' or '.join(site.forms)} form"
        if self.needs_slots and not site.has_slots:
            return f"{self.name} addresses slots, and {site.name} has none"
        if self.only_at is not None and site.name not in self.only_at:
            return f"{self.name} acts only at {', '.join(self.only_at)}"
        return None


def accepting_sites(op: Op) -> list[str]:
    return [name for name, site in SITES.items() if op.refusal(site) is None]


def check_accepts(site_name: str, op: Op, key: str = "intervention.site") -> Site:
    """The declared site, or one line naming the key and the sites that do accept this op (plan-time check)."""
    ok = accepting_sites(op)
    if site_name in SITES and site_name not in ok:
        raise ConfigError(key, op.refusal(SITES[site_name]), f"use one of: {', '.join(ok)}")
    require_choice(site_name, ok, key, "site")
    return SITES[site_name]


@dataclass
class Call:
    """The text_fusion call in progress, as seen by its entry hook."""

    state: Any = None
    taps: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.taps.shape[0]


# --------------------------------------------------------------------------------------------------- named hooks
# ------------------------------------------------------------------------------------------------ installers
@contextmanager
def _install_states(site: Site, op: Op, gates, ctx, index: int) -> Iterator[None]:
    """A pre- or forward hook at the site that edits the states in canonical layout, plus an entry hook on
    text_fusion that records the call (token mask, taps, batch) for ops and layouts that need it."""
    tf = text_fusion(ctx)
    call = Call()
    layout = site.layout

    def record(module, args, kwargs):
        call.state, call.taps, call.mask = ctx.state, args[0], fusion_mask(args, kwargs)

    def edited(x):
        return layout.from_canonical(op.states(layout.to_canonical(x, call), call), x, call)

    if site.hook == "pre":
        def hook(module, args, kwargs):
            if not gates.active(ctx.state):
                return None
            return replace_first_arg(args, edited(args[0])), kwargs
    else:
        def hook(module, args, output):
            if not gates.active(ctx.state):
                return None
            return edited(output)

    with hooked(tf, record, pre=True, with_kwargs=True), \
            hooked(site.module(ctx, index), hook, pre=site.hook == "pre", with_kwargs=site.hook == "pre"):
        yield


@contextmanager
def _install_weight(site: Site, op: Op, gates, ctx, index: int) -> Iterator[None]:
    with projector_hook(gates, ctx, op.weight, renorm=op.renorm, module=site.module(ctx, index)):
        yield


@contextmanager
def _install_key_mask(site: Site, op: Op, gates, ctx, index: int) -> Iterator[None]:
    with masked_attention(gates, ctx, [site.module(ctx, index)], op.key_mask()):
        yield


class GatedProcessor:
    """The processor an op made (`op.processor(inner, index)`) while the gates are open, the module's own otherwise."""

    def __init__(self, inner, wrapped, gates, ctx):
        self.inner, self.wrapped, self.gates, self.ctx = inner, wrapped, gates, ctx

    def __call__(self, attn, *args, **kwargs):
        processor = self.wrapped if self.gates.active(self.ctx.state) else self.inner
        return processor(attn, *args, **kwargs)


@contextmanager
def _install_processor(site: Site, op: Op, gates, ctx, index: int) -> Iterator[None]:
    """Wrap the attention module's processor (`set_processor`, public); the very same object is put back on exit."""
    module = site.module(ctx, index)
    inner = module.processor
    module.set_processor(GatedProcessor(inner, op.processor(inner, index), gates, ctx))
    try:
        yield
    finally:
        module.set_processor(inner)


INSTALLERS = {"states": _install_states, "weight": _install_weight, "key_mask": _install_key_mask,
              "processor": _install_processor}


@contextmanager
def attach(site_name: str, op: Op, gates, ctx, *, at: list[int] | None = None,
           key: str = "intervention") -> Iterator[None]:
    """Install `op` at `site_name` (at each block in `at` for per-block sites; default every block), gated by
    `gates.active(state)`, each hook named in `ctx.hooks`; everything is removed on exit, whatever happens."""
    site = check_accepts(site_name, op, f"{key}.site")
    form = next(f for f in site.forms if f in op.forms())
    indices = (list(at) if at is not None else list(range(site.count(ctx)))) if site.per_block else [None]
    with ExitStack() as stack:
        for index in indices:
            stack.enter_context(INSTALLERS[form](site, op, gates, ctx, index))
            stack.enter_context(ctx.hooks.named(key, site.name, op.name, index))
        yield


# -------------------------------------------------------------------------------------------------- capture
class Always:
    """Gates that are always open (capture, tracing: not an intervention of the job)."""

    @staticmethod
    def active(state) -> bool:
        return True


class Probe(Op):
    """A read-only op at an attention site (`dit_attention`, `fusion_attention`, `refiner_attention`): block `index`'s
    processor wrapped by `make(inner, index)`, which must run `inner` unchanged (the output stays the stock one) and
    only record. What the map and attention metrics install, so their probes are named hooks like any op."""

    def __init__(self, name: str, make):
        self.name, self.make = name, make

    def processor(self, inner, index: int):
        return self.make(inner, index)


@contextmanager
def probing(ctx, site: str, name: str, make, at=None, key: str = "metrics") -> Iterator[None]:
    """`Probe(name, make)` attached at `site` (every block, or those in `at`), always open, under `key`."""
    with attach(site, Probe(name, make), Always(), ctx, at=at, key=key):
        yield


class _Grab(Op):
    """Keeps the canonical states it sees and returns them unchanged (what `capture` reads)."""

    name = "capture"

    def __init__(self):
        self.seen: torch.Tensor | None = None

    def states(self, x, call):
        self.seen = x
        return x


def capture(ctx, encoded, site: str, index: int = 0) -> torch.Tensor:
    """The canonical states at `site` for `encoded` ([B, T, 12, D], or [B, T, D] at fused and dit_text), through the
    text path as currently attached (and txt_in, for a site after it): what reference statistics (ablate mean, steer
    directions, patch sources) are computed from, so they live in the space the edit is applied in."""
    grab = _Grab()
    run = SITES[site].run or (lambda c, taps, mask: c.text_path(taps, mask))
    with torch.no_grad(), attach(site, grab, Always(), ctx, at=[index], key="capture"):
        run(ctx, encoded.taps, encoded.mask)
    return grab.seen
