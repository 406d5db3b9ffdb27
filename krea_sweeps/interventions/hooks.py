"""Ops, and the one generic `attach` that installs any op at any site that accepts it, as named hooks.

An op is a pure function of (states, call, its parameters): `states(x, call)` maps canonical states ([B, T, 12, D],
or [B, T, D] where the site has no slots) to edited ones; `weight(w)` maps the projector weight to an edited one;
`key_mask()` gives the slots a layerwise attention may attend to. An op provides one or more of these forms, and a
site (`sites.SITES`) takes exactly one. `call` is the text_fusion call in progress: `call.state` (CFG branch and
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

FORMS = ("states", "weight", "key_mask")


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

    renorm: bool = False  # weight form: rescale the edited projector output to the stock output's RMS

    @classmethod
    def forms(cls) -> tuple[str, ...]:
        return tuple(f for f in FORMS if getattr(cls, f) is not getattr(Op, f))

    def refusal(self, site: Site) -> str | None:
        """Why this op cannot act at `site` (None: it can)."""
        if site.form not in self.forms():
            return f"{self.name} has no {site.form} form"
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


INSTALLERS = {"states": _install_states, "weight": _install_weight, "key_mask": _install_key_mask}


@contextmanager
def attach(site_name: str, op: Op, gates, ctx, *, at: list[int] | None = None,
           key: str = "intervention") -> Iterator[None]:
    """Install `op` at `site_name` (at each layerwise block in `at` for per-block sites; default every block), gated by
    `gates.active(state)`, each hook named in `ctx.hooks`; everything is removed on exit, whatever happens."""
    site = check_accepts(site_name, op, f"{key}.site")
    every_block = range(len(text_fusion(ctx).layerwise_blocks)) if site.per_block and at is None else ()
    indices = (list(at) if at is not None else list(every_block)) if site.per_block else [None]
    with ExitStack() as stack:
        for index in indices:
            stack.enter_context(INSTALLERS[site.form](site, op, gates, ctx, index))
            stack.enter_context(ctx.hooks.named(key, site.name, op.name, index))
        yield


# -------------------------------------------------------------------------------------------------- capture
class Always:
    """Gates that are always open (capture, tracing: not an intervention of the job)."""

    @staticmethod
    def active(state) -> bool:
        return True


class _Grab(Op):
    """Keeps the canonical states it sees and returns them unchanged (what `capture` reads)."""

    name = "capture"

    def __init__(self):
        self.seen: torch.Tensor | None = None

    def states(self, x, call):
        self.seen = x
        return x


def capture(ctx, encoded, site: str, index: int = 0) -> torch.Tensor:
    """The canonical states at `site` for `encoded` ([B, T, 12, D], or [B, T, D] at fused), through the text path
    as currently attached: what reference statistics (ablate mean, steer directions, patch sources) are computed
    from, so they live in the space the edit is applied in."""
    grab = _Grab()
    with torch.no_grad(), attach(site, grab, Always(), ctx, at=[index], key="capture"):
        ctx.text_path(encoded.taps, encoded.mask)
    return grab.seen
