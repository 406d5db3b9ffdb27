"""Exact attention probabilities for Krea 2's text-fusion blocks, and the aggregates the model card reports.

diffusers never materialises attention probabilities (`dispatch_attention_fn` goes straight to a fused kernel), so we
measure them beside the kernel: a `ProbingAttnProcessor` wraps each attention module's processor — the metrics
install it as a read-only op at the `fusion_attention` / `refiner_attention` sites (`hooks.probing`, named in the
session's registry); `probed(modules)` does the same on any list of modules (tests). The probe runs the module's
*own* processor unchanged (so the features stay bit-identical) while reading the normalised query and key it computed (forward hooks on `norm_q` / `norm_k`), and computes P = softmax(QKᵀ/√d) explicitly in
float32. The old processors are put back on exit. Tests prove P against the kernel (identity-V) and P·V against the
module's output.

The aggregate functions are plain tensor maths on [tokens, heads, queries, keys] so they can be checked on hand-made
tensors.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


# ------------------------------------------------------------------------------------------------ measurement
def attention_probabilities(query: torch.Tensor, key: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√d) in float32 for diffusers' [N, S, heads, d] layout → [N, heads, S_q, S_k].

    Key heads are repeated for grouped-query attention as the processor does; a boolean mask keeps True keys (SDPA's
    convention), a float mask is added. A row with every key masked is NaN in an explicit softmax but zeros in SDPA:
    it is set to zeros here too.
    """
    heads = query.shape[2]
    if key.shape[2] != heads:
        key = key.repeat_interleave(heads // key.shape[2], dim=2)
    scores = torch.einsum("nqhd,nkhd->nhqk", query.float(), key.float()) * query.shape[-1] ** -0.5
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    return torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)


@dataclass
class AttentionCall:
    """One call of a probed attention module: P [N, heads, S, S]; with `keep_inputs`, also the q/k/v/gate the
    processor computed, the mask it was given and its output (for the exactness tests)."""

    probs: torch.Tensor
    inputs: dict = field(default_factory=dict)


class ProbingAttnProcessor:
    """Runs the wrapped processor as is and records the attention probabilities it used.

    Wrapping (rather than copying the processor's code) keeps the output the stock kernel's, bit for bit, and keeps
    whatever backend / parallel config the module had: the wrapped processor keeps its own and runs the kernel; the
    probe only reads q/k (hooks on `norm_q`/`norm_k`) and computes P itself, so it needs none of the processor's
    private settings.
    """

    def __init__(self, inner, calls: list[AttentionCall], keep_inputs: bool = False):
        self.inner = inner
        self.calls = calls
        self.keep_inputs = keep_inputs

    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        seen: dict[str, torch.Tensor] = {}

        def grab(name):
            def hook(module, args, output):
                seen[name] = output

            return hook

        sites = {"query": attn.norm_q, "key": attn.norm_k}
        if self.keep_inputs:
            sites |= {"value": attn.to_v, "gate": attn.to_gate}
        handles = [module.register_forward_hook(grab(name)) for name, module in sites.items()]
        try:
            output = self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        finally:
            for h in handles:
                h.remove()
        query, key = seen["query"], seen["key"]
        if image_rotary_emb is not None:  # text fusion has none; kept so the probe is right on DiT blocks too
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        call = AttentionCall(attention_probabilities(query.detach(), key.detach(), attention_mask))
        if self.keep_inputs:
            value = seen["value"].unflatten(-1, (attn.num_kv_heads, attn.head_dim))
            call.inputs = {"query": query.detach(), "key": key.detach(), "value": value.detach(),
                           "gate": seen["gate"].detach(), "mask": attention_mask, "output": output.detach()}
        self.calls.append(call)
        return output


@contextmanager
def probed(modules: list, keep_inputs: bool = False) -> Iterator[list[list[AttentionCall]]]:
    """Swap each attention module's processor for a probe; yields one list of calls per module; restores the exact
    processor objects on exit, whatever happens inside."""
    old = [m.processor for m in modules]
    calls: list[list[AttentionCall]] = [[] for _ in modules]
    try:
        for m, proc, sink in zip(modules, old, calls):
            m.set_processor(ProbingAttnProcessor(proc, sink, keep_inputs))
        yield calls
    finally:
        for m, proc in zip(modules, old):
            m.set_processor(proc)


# ------------------------------------------------------------------------------------ cross-layer aggregates
def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each distribution along the last axis; 0·log 0 = 0."""
    p = probs.double()
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def layer_attention_stats(probs: torch.Tensor) -> dict:
    """Aggregates of cross-layer attention P [tokens, heads, L queries, L keys] over the given (content) tokens.

    mean_map [L, L]      P averaged over tokens and heads
    head_maps [H, L, L]  P averaged over tokens, per head
    top_key_share [L]    fraction of tokens whose head-averaged column strength c_t,k = mean_{h,q} P[t,h,q,k]
                         peaks at k (ties go to the lowest k)
    entropy              mean row entropy (nats) over tokens, heads and query rows
    and what `with_derived` adds (strength, hub, …).
    """
    p = probs.double()
    n_tokens, n_layers = p.shape[0], p.shape[-1]
    top = p.mean(dim=(1, 2)).argmax(-1)
    return with_derived({
        "mean_map": p.mean(dim=(0, 1)),
        "head_maps": p.mean(0),
        "top_key_share": torch.bincount(top, minlength=n_layers).double() / max(n_tokens, 1),
        "entropy": float(row_entropy(p).mean()),
    })


def with_derived(stats: dict) -> dict:
    """What follows from the mean maps: strength [L] s_k = mean over query rows of mean_map[:, k] (sums to 1); hub =
    argmax_k s_k; hub_ratio = s_hub / the next largest s_k; head_hubs [H] = argmax of each head's column strength;
    head_hub_agreement = fraction of heads whose hub is the hub; entropy_norm = entropy / log L."""
    mean_map = stats["mean_map"]
    n_layers = mean_map.shape[-1]
    strength = mean_map.mean(0)
    order = strength.argsort(descending=True)
    hub, second = int(order[0]), int(order[1])
    head_hubs = stats["head_maps"].mean(1).argmax(-1)
    return {
        **stats,
        "strength": strength,
        "hub": hub,
        "hub_ratio": float(strength[hub] / strength[second]) if strength[second] > 0 else math.inf,
        "head_hubs": head_hubs,
        "head_hub_agreement": float((head_hubs == hub).double().mean()),
        "entropy_norm": stats["entropy"] / math.log(n_layers),
    }


def average_layer_stats(per_prompt: list[dict]) -> dict:
    """Each prompt weighs equally: average the linear aggregates, then derive the hub from the averages."""
    keys = ("mean_map", "head_maps", "top_key_share")
    avg = {k: torch.stack([s[k] for s in per_prompt]).mean(0) for k in keys}
    avg["entropy"] = sum(s["entropy"] for s in per_prompt) / len(per_prompt)
    return with_derived(avg)


# ------------------------------------------------------------------------------------ token-axis aggregates
def token_attention_stats(probs: torch.Tensor, query_positions: torch.Tensor, key_mask: torch.Tensor,
                          window: int = 8) -> dict:
    """Aggregates of one prompt's token attention (a refiner block) over its content query rows.

    probs [heads, Q, T] are the rows of the Q content queries at sequence positions `query_positions`; key_mask [T]
    marks the valid keys. Distances are in valid-token rank (cumsum of the key mask − 1), so the padding between
    the prompt and the template suffix does not count as distance.
    local_share            mean over heads and content queries of the mass on keys within ±`window` ranks
    local_share_uniform    the same for uniform attention over the valid keys (the no-structure reference)
    received [n_valid]     r_k = mean over heads and content queries of P[h, q, k], valid keys only (sums to 1)
    received_entropy_norm  H(r) / log(n_valid): 1 = perfectly diffuse, 0 = one sink token
    top_received_x_uniform max_k r_k · n_valid (1 = uniform);  top_received_rank its valid-token rank
    """
    key_mask = key_mask.bool()
    rank = key_mask.long().cumsum(0) - 1
    p = probs.double()[:, :, key_mask]  # [H, Q, n_valid]
    q_rank, k_rank = rank[query_positions], rank[key_mask]
    near = (q_rank[:, None] - k_rank[None, :]).abs() <= window  # [Q, n_valid]
    n_valid = int(key_mask.sum())
    received = p.mean(dim=(0, 1))
    top = int(received.argmax())
    return {
        "local_share": float((p * near).sum(-1).mean()),
        "local_share_uniform": float(near.double().sum(-1).mean() / n_valid),
        "received": received,
        "received_entropy_norm": float(row_entropy(received) / math.log(n_valid)) if n_valid > 1 else 0.0,
        "top_received_x_uniform": float(received[top] * n_valid),
        "top_received_rank": int(k_rank[top]),
        "n_valid": n_valid,
    }
