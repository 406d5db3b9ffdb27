"""One instrumented pass through the text path, shared by every conditioning-side metric of a job.

The conditioning metrics all look at the same forward pass (taps → layerwise blocks → projector → refiners → txt_in's
norm), so it is run once per prompt, with hooks reading what each stage *received and delivered* under the job's
interventions, and memoised on the JobContext. Hooks are registered inside the intervention context, after the
interventions' own hooks, so they see the edited tensors; all are removed on exit. Only content tokens are kept
(the real model pads to 512 tokens; the metrics average over the ~tens of content tokens).

Conditioning-side metrics see the text path as the positive branch at denoising step 0 does (the job's
`Denoising.current` reads cond/0 outside a pipeline call): an intervention gated to `uncond` or to a later step
window is inactive here.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from ..interventions.hooks import probing
from .attention import ProbingAttnProcessor

# Parts a metric may ask for besides the always-recorded taps, slots, projector output and fused features.
PARTS = frozenset({"fusion_attention", "refiner_attention", "normed"})


@dataclass
class PromptTrace:
    """One prompt's pass, content tokens only (Tc of them) unless noted."""

    mask: torch.Tensor  # [T] bool, valid tokens (all positions)
    content: torch.Tensor  # [T] bool, content tokens (all positions)
    taps: torch.Tensor  # [Tc, 12, D] as text_fusion received them
    slots: torch.Tensor  # [Tc, D, 12] as the projector received them
    projected: torch.Tensor  # [Tc, D] what the projector delivered (after any hooks on it)
    weight: torch.Tensor  # [12] the projector's weight parameter as seen during the pass
    fused: torch.Tensor  # [Tc, D] text_fusion output (after the refiners)
    normed: torch.Tensor | None = None  # [Tc, D] txt_in.norm output
    fusion_attention: list[torch.Tensor] = field(default_factory=list)  # per block [Tc, H, 12, 12]
    refiner_attention: list[torch.Tensor] = field(default_factory=list)  # per block [H, Tc, T] (content queries)


@dataclass
class TextTrace:
    prompts: list[PromptTrace]
    parts: frozenset
    intervened: bool


def requested_parts(ctx) -> frozenset:
    parts = set()
    for metric in ctx.job.metrics:
        parts |= set(getattr(metric, "trace_parts", ()))
    return frozenset(parts & PARTS)


def text_trace(ctx, intervened: bool = True, parts: frozenset | set = frozenset()) -> TextTrace:
    """The job's text-path pass (with its interventions, or stock), memoised per job; a stock job's two are one.
    Each pass records at once what every metric of the job asks for, so it runs once."""
    intervened = intervened and not ctx.job.is_stock
    parts = frozenset(parts) | requested_parts(ctx)
    if intervened:
        cached = ctx.cache.get(("text_trace", True))
    else:
        cached = stock_memo(ctx)
    if cached is not None and parts <= cached.parts:
        return cached
    if cached is not None:
        parts |= cached.parts
    traces = [trace_prompt(ctx, ctx.encoded.index(i), intervened, parts) for i in range(len(ctx.job.prompts))]
    trace = TextTrace(traces, parts, intervened)
    if intervened:
        ctx.cache[("text_trace", True)] = trace
    else:
        ctx.session.stock_traces[stock_key(ctx)] = (weakref.ref(ctx.text_path.text_fusion), trace)
    return trace


# The stock pass depends on the model and the prompts only: once per sweep (in the session), not once per job. Each
# entry holds a weak reference to the `text_fusion` module it was traced on and serves only that module.


def stock_key(ctx) -> tuple:
    import json

    if "stock_key" not in ctx.cache:
        ctx.cache["stock_key"] = (json.dumps(ctx.model.variant.identity(), sort_keys=True, default=str),
                                  tuple(ctx.job.prompts), int(ctx.job.sampler.max_sequence_length))
    return ctx.cache["stock_key"]


def stock_memo(ctx) -> TextTrace | None:
    ref, trace = ctx.session.stock_traces.get(stock_key(ctx), (None, None))
    return trace if ref is not None and ref() is ctx.text_path.text_fusion else None


@torch.no_grad()
def trace_prompt(ctx, encoded, intervened: bool, parts: frozenset, upstream: dict | None = None) -> PromptTrace:
    """One prompt's pass on its valid tokens only (the padding trimmed: exact in math — the layerwise blocks work per
    token and the refiners have no positions, pads being masked keys only — and 1/10 of the work at 512 tokens).
    `upstream` receives the projector's input as the text path passed it and the refiners' mask (`ProjectorUpstream`)."""
    from ..sampler import trim_padding

    encoded = trim_padding(encoded)
    text_path = ctx.text_path
    tf = text_path.text_fusion
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output

        return hook

    def keep_input(name):
        def hook(module, args, kwargs=None):
            seen[name] = args[0]

        return hook

    def hooked(handle, site: str, what: str):  # every hook of the trace listed by Session.attached() while it runs
        stack.enter_context(_hook(handle))
        stack.enter_context(ctx.session.hooks.named("metrics.trace", site, what))

    with ExitStack() as stack:
        if intervened:
            stack.enter_context(ctx.intervened())
        hooked(tf.register_forward_pre_hook(keep_input("taps"), with_kwargs=True), "taps", "keep")
        hooked(tf.projector.register_forward_pre_hook(keep_input("slots")), "slots", "keep")
        hooked(tf.projector.register_forward_hook(keep("projected")), "projector", "keep output")
        layer_calls = refiner_calls = None
        probes = ctx.intervention_context()
        if "fusion_attention" in parts:  # the attention probes: read-only ops at the attention sites
            layer_calls = [[] for _ in tf.layerwise_blocks]
            stack.enter_context(probing(probes, "fusion_attention", "attention", _recorder(layer_calls),
                                        key="metrics.trace"))
        if "refiner_attention" in parts:
            refiner_calls = [[] for _ in tf.refiner_blocks]
            stack.enter_context(probing(probes, "refiner_attention", "attention", _recorder(refiner_calls),
                                        key="metrics.trace"))
        weight = tf.projector.weight.detach().reshape(-1).clone()
        fused = text_path(encoded.taps, encoded.mask)
        if "normed" in parts:
            with _hook(text_path.txt_in.norm.register_forward_hook(keep("normed"))), \
                    ctx.session.hooks.named("metrics.trace", "txt_in.norm", "keep output"):
                text_path.txt_in(fused)

    if upstream is not None:
        upstream.update(slots=seen["slots"], content=encoded.content[0],
                    text_mask=encoded.mask[:, None, None, :] if encoded.mask is not None else None)
    mask = encoded.mask[0].bool()
    content = encoded.content[0]  # the user text alone (each row's own tail length: see prompts.content_mask)
    T = mask.shape[0]
    out = PromptTrace(
        mask=mask.cpu(), content=content.cpu(),
        taps=seen["taps"][0][content].float().cpu(),
        slots=seen["slots"][0][content].float().cpu(),
        projected=seen["projected"].reshape(1, T, -1)[0][content].float().cpu(),
        weight=weight.float().cpu(),
        fused=fused[0][content].float().cpu(),
        normed=seen["normed"][0][content].float().cpu() if "normed" in seen else None,
    )
    if layer_calls is not None:
        # layerwise attention runs over the 12-tap axis of each of the B·T tokens: [B·T, H, 12, 12]
        out.fusion_attention = [calls[-1].probs.unflatten(0, (1, T))[0][content].cpu() for calls in layer_calls]
    if refiner_calls is not None:
        out.refiner_attention = [calls[-1].probs[0][:, content].cpu() for calls in refiner_calls]
    return out


def _recorder(calls: list[list]):
    """A probe's processor maker: block i's attention probabilities appended to `calls[i]`."""
    return lambda old, i: ProbingAttnProcessor(old, calls[i])


@contextmanager
def _hook(handle):
    try:
        yield handle
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------- configs sharing the upstream
# A projector-site edit (solo, leave-one-out, rebalance, tap gains … at site=projector) hooks the projector only:
# everything upstream of it — the taps, the layerwise blocks and their attention — is the stock pass's. A batch of
# such configs (`krea_sweeps.batch`) runs that part once per prompt, each config the projector (with its edit), and
# the refiners once per prompt for a chunk of configs stacked along the batch axis: its trace is bit-identical to its
# own full pass on CPU (tests/test_speed.py compares every summary, row and array).


@dataclass
class ProjectorUpstream:
    """One prompt's stock pass up to the projector: its trace, the projector's input and the refiners' mask."""

    stock: PromptTrace
    slots: torch.Tensor  # [1, T, D, 12] as text_fusion passes it to the projector (the same view: same kernels)
    content: torch.Tensor  # [T] bool on the model's device
    text_mask: torch.Tensor | None


def edits_projector_only(job) -> bool:
    """Whether every intervention of `job` is installed by the generic attach at the `projector` site (a weight op
    in the projector's forward-hook chain) and so touches nothing upstream or downstream of the projector."""
    from ..interventions.base import Intervention

    return bool(job.interventions) and all(type(i).attach is Intervention.attach and i.placement[0] == "projector"
                                           for i in job.interventions)


def projector_upstream(ctx, parts: frozenset) -> list[ProjectorUpstream]:
    """The stock pass of each of the job's prompts, keeping what `projector_edit_traces` starts from."""
    out = []
    for i in range(len(ctx.job.prompts)):
        kept: dict = {}
        stock = trace_prompt(ctx, ctx.encoded.index(i), False, parts, kept)
        out.append(ProjectorUpstream(stock, kept["slots"], kept["content"], kept["text_mask"]))
    return out


@torch.no_grad()
def projector_edit_traces(ctxs: list, upstream: list[ProjectorUpstream], parts: frozenset) -> list[TextTrace]:
    """`text_trace(ctx)` for each of `ctxs`, jobs whose interventions edit the projector only (`edits_projector_only`),
    from the shared stock upstream: the taps, layerwise blocks and their attention are the stock pass's. Each config
    runs the projector (hooks and all) under its own edit, alone (the call its own pass makes); the refiners and
    `txt_in` then run once per prompt for all of them, stacked along the batch axis. Their work is per row (attention within a row, norms and linears per token), and on CPU the result
    of a row does not depend on how many rows ran beside it: bit-identical to one config at a time on the synthetic
    model (`tests/test_speed.py`). A backend whose kernels change with the batch size would differ in the last bits:
    pass one context at a time there."""
    require_parts = parts - {"fusion_attention", "normed"}
    if require_parts:
        raise ValueError(f"projector_edit_traces cannot record {sorted(require_parts)}")
    text_path = ctxs[0].text_path
    tf = text_path.text_fusion
    weights, projected = [], [[] for _ in upstream]  # per config; per prompt, per config
    for ctx in ctxs:
        with ctx.intervened():
            weights.append(tf.projector.weight.detach().reshape(-1).clone().float().cpu())
            for i, up in enumerate(upstream):
                projected[i].append(tf.projector(up.slots))
    per_prompt = []  # per prompt: (projected, fused, normed), each stacked over the configs
    for up, outs in zip(upstream, projected):
        stacked = torch.cat(outs)  # [K, T, D, 1]
        hidden = stacked.squeeze(-1)
        mask = up.text_mask.expand(len(ctxs), *up.text_mask.shape[1:]) if up.text_mask is not None else None
        for block in tf.refiner_blocks:
            hidden = block(hidden, attention_mask=mask)
        normed = None
        if "normed" in parts:
            seen = {}
            with _hook(text_path.txt_in.norm.register_forward_hook(lambda m, a, o: seen.update(normed=o))):
                text_path.txt_in(hidden)
            normed = seen["normed"]
        per_prompt.append((stacked, hidden, normed))
    out = []
    for k, weight in enumerate(weights):
        traces = []
        for up, (stacked, hidden, normed) in zip(upstream, per_prompt):
            stock, content = up.stock, up.content
            T = stock.mask.shape[0]
            traces.append(PromptTrace(
                mask=stock.mask, content=stock.content, taps=stock.taps, slots=stock.slots,
                projected=stacked[k].reshape(T, -1)[content].float().cpu(), weight=weight,
                fused=hidden[k][content].float().cpu(),
                normed=normed[k][content].float().cpu() if normed is not None else None,
                fusion_attention=stock.fusion_attention if "fusion_attention" in parts else []))
        out.append(TextTrace(traces, frozenset(parts), True))
    return out
