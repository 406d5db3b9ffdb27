"""The installers of the sites that take a weight or a key mask (`hooks.attach` calls them): the projector's shared
edit chain and the masked layerwise attention. Below `hooks`, `base` and the interventions that use them, so the
generic attach never imports an intervention module.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from .sites import NUM_SLOTS, hooked, projector

if TYPE_CHECKING:
    from .base import Intervention, InterventionContext


def rms_like(edited: torch.Tensor, stock: torch.Tensor, dim: int) -> torch.Tensor:
    """Rescale each token of `edited` to the RMS of `stock` along `dim` (the community's fix for the magnitude
    inflation that projector boosts cause: the refiners are pre-norm residual blocks, not scale-invariant)."""
    def rms(x):
        return x.float().pow(2).mean(dim, keepdim=True).sqrt()

    ratio = rms(stock) / rms(edited).clamp_min(torch.finfo(torch.float32).tiny)
    return edited * ratio.to(edited.dtype)


class _ProjectorChain:
    """The one forward hook on a projector module, shared by every projector-site edit attached to it: the output is
    `F.linear(x, f_n(…f_1(w)))` over the active edits in attach (= list) order. One hook, not one per edit, so edits
    compose (each hook returning its own `F.linear(x, f_i(w))` would discard the earlier ones) while a single edit
    stays bit-identical to replacing the weight. With any active `renorm`, the composed output is rescaled per token
    to the RMS of the stock output (stock weight, same input)."""

    def __init__(self, module: torch.nn.Module):
        self.entries: list[tuple] = []  # (intervention, context, weight_fn, renorm)
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        active = [e for e in self.entries if e[0].active(e[1].state)]  # the call running now
        if not active:
            return None
        weight = module.weight
        for _, _, weight_fn, _ in active:
            weight = weight_fn(weight)
        edited = F.linear(args[0], weight, module.bias)
        return rms_like(edited, output, dim=-2) if any(e[3] for e in active) else edited


@contextmanager
def projector_hook(intervention: Intervention, ctx: InterventionContext, weight_fn, renorm: bool = False,
                   module: torch.nn.Module | None = None):
    """Join the projector's edit chain while attached: when active, `weight_fn` maps the weight so far (stock, or
    the earlier edits' result) to the next one. Nothing is written to the parameter; the hook goes with the last
    edit. (The `projector` site's installer: `hooks.attach` calls this.)"""
    module = projector(ctx) if module is None else module
    chains = ctx.projector_chains  # the session's: edits attached through one context share one chain per module
    chain = chains.get(module)
    if chain is None:
        chain = chains[module] = _ProjectorChain(module)
    entry = (intervention, ctx, weight_fn, renorm)
    chain.entries.append(entry)
    try:
        yield
    finally:
        chain.entries = [e for e in chain.entries if e is not entry]
        if not chain.entries:
            chain.handle.remove()
            chains.pop(module, None)


def key_mask(keys_visible: list[bool], queries: list[int] | None = None) -> torch.Tensor:
    """Bool mask (True = may attend): [1, 1, 1, 12] for every query, or [1, 1, 12, 12] for the listed queries."""
    visible = torch.tensor(keys_visible, dtype=torch.bool)
    if queries is None:
        return visible.view(1, 1, 1, NUM_SLOTS)
    mask = torch.ones(NUM_SLOTS, NUM_SLOTS, dtype=torch.bool)
    mask[queries] = visible
    return mask.view(1, 1, NUM_SLOTS, NUM_SLOTS)


@contextmanager
def masked_attention(intervention: Intervention, ctx: InterventionContext, modules: list, mask: torch.Tensor
                     ) -> Iterator[None]:
    """Inject `mask` into the given attention modules while `intervention` is active (ANDed with any mask already
    there, so knockouts compose). Query rows left with no visible key by the mask actually used — which for
    composed knockouts can be dead although neither mask alone is — get zero output, whatever the kernel. (The
    `fusion_attention` site's installer: `hooks.attach` calls this.)"""
    used = {}  # id(module) -> the combined mask this hook passed on in the current call

    def pre(module, args, kwargs):
        if not intervention.active(ctx.state):
            used.pop(id(module), None)
            return None
        m = mask.to(args[0].device)
        existing = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if existing is not None:
            m = existing.bool() & m
        used[id(module)] = m
        if len(args) > 1:
            return (args[0], m, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": m}

    def zero_dead(module, args, output):
        m = used.pop(id(module), None)
        if m is None:
            return None
        dead = (~m.any(-1)).all(1)  # [b, q]: queries with no visible key (in every head); no host sync to ask
        rows = dead.expand(output.shape[0], output.shape[-2])
        return output.masked_fill(rows[..., None], 0.0)

    with ExitStack() as stack:
        for attn in modules:
            stack.enter_context(hooked(attn, pre, pre=True, with_kwargs=True))
            stack.enter_context(hooked(attn, zero_dead))
        yield
