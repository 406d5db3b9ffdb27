"""Word maps (metric `word_maps`, DAAM-style for a single-stream DiT): where in the image each word of the prompt is
attended to, exactly as Krea 2's DiT blocks attend.

Each of the 28 `Krea2TransformerBlock`s runs one joint attention over `[text; image]`; the probability that image
query i puts on text key j is softmax over *all* keys (text and image, with the key mask) of QKᵀ/√d. diffusers never
materialises it, so the recorder wraps each chosen block's processor: the processor runs unchanged (the image is
bit-identical with and without the metric — tested), and beside it the normalised, rotated query and key it computed
give, per chunk of image queries, the logits against every key, their logsumexp (the normaliser), and
exp(logit − logsumexp) on the text columns only. Head-mean, then mean over the chosen blocks and denoising steps
(conditional CFG branch only), per prompt × seed: P̄ [image tokens, valid text tokens].

Words: the content tokens' character offsets (the tokenizer's offsets) group sub-tokens into words (`\\w+` runs, and
punctuation runs); a word's map is the sum of its tokens' columns, reshaped to the latent grid (H/16 × W/16, row
major as the pipeline packs it) and bilinearly upsampled to the image.

Array layout (in the job's `arrays/`, `p<prompt:02d>_s<seed>`):
  word_maps.p00_s0.npy         [words, H, W] float32  maps at image resolution (`upsample: true`)
  word_maps.p00_s0.grid.npy    [words, h, w] float32  maps on the latent grid (h = H/16)
  word_maps.p00_s0.tokens.npy  [h·w, valid text tokens] float32  P̄ per token (content then template suffix)
  word_maps.p00.words.npy      [words] str            the words, in prompt order
Summaries per word (on the grid map m, a probability mass): share = mean over image tokens of m; entropy =
H(m/Σm)/log(h·w); centre of mass (y, x) in [0, 1]; area = fraction of cells ≥ max/2; vs the stock run of the same
prompt × seed: Pearson correlation and IoU of the half-max regions. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, TYPE_CHECKING

import numpy as np
import torch

from ..configs import WordMapsFields
from ..errors import require
from ..interventions.hooks import probing
from ..toy.ground_truth import GROUND_TRUTH_STATS, job_scenes, mean_scores, score_named_maps
from .base import Metric, MetricOutput

if TYPE_CHECKING:
    from ..context import JobContext

log = logging.getLogger(__name__)

PIXELS_PER_TOKEN = 16  # Krea 2: VAE ×8, then 2×2 patches


def latent_grid(sampler, model=None) -> tuple[int, int]:
    """The DiT's image-token grid (rows, columns) at the sampler's resolution: the VAE's downsampling (read from the
    loaded VAE when `model` is given, as Krea2Pipeline does) times the pipeline's 2×2 patches."""
    per_token = 2 ** len(model.vae.temperal_downsample) * 2 if model is not None else PIXELS_PER_TOKEN
    return sampler.height // per_token, sampler.width // per_token


def check_index_lists(metric, name: str) -> None:
    """`blocks` / `steps` of a map metric: null (all) or non-negative indices, kept sorted and unique."""
    for key in ("blocks", "steps"):
        value = getattr(metric, key)
        if value is not None:
            require(all(v >= 0 for v in value), f"metrics.{name}.{key}", f"{value!r} is not a list of indices",
                    f"give e.g. metrics.{name}.{key}=[0,1] or null for all")
            setattr(metric, key, sorted(set(value)))


def checked_blocks(transformer, blocks: list[int] | None, key: str) -> list:
    """The DiT's blocks, after checking that every index a map metric records from exists (one line naming `key`)."""
    found = list(transformer.transformer_blocks)
    if blocks is not None:
        require(max(blocks) < len(found), key, f"block {max(blocks)} does not exist (the DiT has {len(found)})",
                f"give indices 0–{len(found) - 1}")
    return found
WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]+")


# ----------------------------------------------------------------------------------------------- the exact maps
def image_text_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, text_len: int,
                         chunk: int = 256) -> torch.Tensor:
    """Head-mean attention probabilities of image queries on text keys, softmax over all keys: [B, N_img, T].

    query/key are diffusers' [B, S, heads, d] (after norm and rotary; key heads repeated for GQA here), S = T + N
    with text first; mask [B, 1, 1, S] bool (True = may attend) or None. Only the image-query rows are computed, in
    chunks of `chunk` queries, so memory stays [B, heads, chunk, S]."""
    heads = query.shape[2]
    if key.shape[2] != heads:
        key = key.repeat_interleave(heads // key.shape[2], dim=2)
    q = query[:, text_len:].float()
    k = key.float()
    scale = query.shape[-1] ** -0.5
    out = torch.empty(q.shape[0], q.shape[1], text_len, dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[1], chunk):
        logits = torch.einsum("bqhd,bkhd->bhqk", q[:, start:start + chunk], k) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf")) if mask.dtype == torch.bool \
                else logits + mask.float()
        lse = logits.logsumexp(-1, keepdim=True)
        probs = (logits[..., :text_len] - lse).exp()
        out[:, start:start + chunk] = torch.nan_to_num(probs, nan=0.0).mean(1)
    return out


class TextAttentionProcessor:
    """Runs the block's own processor unchanged and hands the image→text probabilities it used to `sink`."""

    def __init__(self, inner, sink, block: int):
        self.inner, self.sink, self.block = inner, sink, block

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        seen = {}

        def grab(name):
            def hook(module, args, output):
                seen[name] = output
            return hook

        handles = [attn.norm_q.register_forward_hook(grab("q")), attn.norm_k.register_forward_hook(grab("k"))]
        try:
            output = self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        finally:
            for h in handles:
                h.remove()
        if self.sink.wants(self.block):
            query, key = seen["q"].detach(), seen["k"].detach()
            if image_rotary_emb is not None:
                from diffusers.models.embeddings import apply_rotary_emb

                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            text_len = hidden_states.shape[1] - self.sink.image_tokens
            self.sink.add(image_text_attention(query, key, attention_mask, text_len, self.sink.chunk))
        return output


class MapSink:
    """Accumulates per-seed sums of the recorded maps for one prompt's generation (cond branch, chosen steps); the
    job's `Denoising` says the branch, the step and which seeds the pipeline call running now holds (its `current`)."""

    def __init__(self, denoising, blocks: list[int] | None, steps: list[int] | None, image_tokens: int, num_steps: int,
                 seeds: list[int], chunk: int):
        self.denoising, self.blocks, self.steps = denoising, blocks, steps
        self.image_tokens, self.num_steps, self.seeds, self.chunk = image_tokens, num_steps, seeds, chunk
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def wants(self, block: int) -> bool:
        state = self.denoising.current
        if state.branch != "cond":
            return False
        if self.blocks is not None and block not in self.blocks:
            return False
        return self.steps is None or state.step in self.steps

    def add(self, maps: torch.Tensor) -> None:
        seeds = self.denoising.current.seeds  # the pipeline call's images, in batch order
        require(len(seeds) == maps.shape[0], "sampler", f"recorded maps for {maps.shape[0]} images in a pipeline "
                f"call of {len(seeds)} seeds", "report this: generate with denoising=ctx.denoise")
        for b, seed in enumerate(seeds):
            self.sums[seed] = self.sums.get(seed, 0) + maps[b].double().cpu()
            self.counts[seed] = self.counts.get(seed, 0) + 1

    def means(self) -> dict[int, torch.Tensor]:
        return {s: (self.sums[s] / self.counts[s]).float() for s in self.sums}


def valid_columns(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, T] maps → [N, valid tokens]: T is the padded length (eager path) or already the valid tokens (trimmed)."""
    mask = mask.bool().cpu()
    if maps.shape[-1] == int(mask.sum()):
        return maps
    require(maps.shape[-1] == mask.shape[0], "sampler", f"recorded {maps.shape[-1]} text columns for a prompt of "
            f"{mask.shape[0]} positions", "report this: the DiT saw another text length than encoded")
    return maps[:, mask]


# --------------------------------------------------------------------------------------------------------- words
def content_token_spans(tokenizer, prompt: str, n_content: int) -> list[tuple[int, int]]:
    """Character spans (in the user text) of the prompt's first `n_content` content tokens, from the tokenizer's
    offsets on the text as Krea 2 tokenizes it (template prefix + user text)."""
    from ..prompts import TEMPLATE_PREFIX, body_and_tail, prefix_length

    body = body_and_tail(prompt)[0]
    enc = tokenizer(TEMPLATE_PREFIX + body, return_offsets_mapping=True)
    start = prefix_length(tokenizer)
    offsets = enc["offset_mapping"][start:start + n_content]
    return [(a - len(TEMPLATE_PREFIX), b - len(TEMPLATE_PREFIX)) for a, b in offsets]


def words_of(text: str, spans: list[tuple[int, int]]) -> tuple[list[str], list[list[int]]]:
    """Group token indices into words: a token belongs to the word holding its first non-space character. Tokens of
    whitespace only belong to no word."""
    words = [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]
    members: list[list[int]] = [[] for _ in words]
    for t, (a, b) in enumerate(spans):
        chars = [i for i in range(max(a, 0), b) if i < len(text) and not text[i].isspace()]
        if not chars:
            continue
        for w, (_, ws, we) in enumerate(words):
            if ws <= chars[0] < we:
                members[w].append(t)
                break
    keep = [w for w in range(len(words)) if members[w]]
    return [words[w][0] for w in keep], [members[w] for w in keep]


def word_grid_maps(token_maps: torch.Tensor, members: list[list[int]], grid: tuple[int, int]) -> np.ndarray:
    """[N, tokens] → [words, h, w]: each word's sub-token columns summed, reshaped row-major to the latent grid."""
    h, w = grid
    cols = [token_maps[:, idx].sum(-1) for idx in members]
    if not cols:
        return np.zeros((0, h, w), dtype=np.float32)
    return torch.stack(cols).reshape(len(cols), h, w).numpy().astype(np.float32)


def upsample(grid_maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) from the latent grid to the image, [words, H, W]."""
    if len(grid_maps) == 0:
        return np.zeros((0, *size), dtype=np.float32)
    t = torch.from_numpy(grid_maps)[:, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


# ------------------------------------------------------------------------------------------------------ summaries
def map_stats(m: np.ndarray) -> dict[str, float]:
    """share, entropy (normalised), centre of mass (y, x in [0, 1]) and half-max area of one grid map."""
    m = np.asarray(m, dtype=np.float64)
    n = m.size
    total = m.sum()
    p = m / total if total > 0 else np.full_like(m, 1.0 / n)
    nz = p[p > 0]
    h, w = m.shape
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    return {
        "share": float(m.mean()),
        "entropy": float(-(nz * np.log(nz)).sum() / math.log(n)) if n > 1 else 0.0,
        "com_y": float((p.sum(1) * ys).sum()),
        "com_x": float((p.sum(0) * xs).sum()),
        "area": float((m >= 0.5 * m.max()).mean()) if m.max() > 0 else 0.0,
    }


def compare_maps(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Pearson correlation of two maps (0 when either is constant) and IoU of their half-max regions."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt((da * da).sum() * (db * db).sum())
    ra, rb = a >= 0.5 * a.max(), b >= 0.5 * b.max()
    union = (ra | rb).sum()
    return {"corr": float((da * db).sum() / denom) if denom > 0 else 0.0,
            "iou": float((ra & rb).sum() / union) if union else 0.0}


# ---------------------------------------------------------------------------------------------------- the metric
@dataclass
class WordMaps(WordMapsFields, Metric):
    """Per-word attention maps over the image from the DiT's joint attention (see the module docstring)."""

    name: ClassVar[str] = "word_maps"
    records_generation: ClassVar[bool] = True
    STATS: ClassVar[tuple] = ("share", "entropy", "com_y", "com_x", "area")
    SUMMARY: ClassVar[tuple] = ("text_share", "share", "entropy", "area")
    VS_STOCK: ClassVar[tuple] = ("corr", "iou")

    def __post_init__(self):
        super().__post_init__()
        check_index_lists(self, "word_maps")
        require(self.chunk > 0, "metrics.word_maps.chunk", f"{self.chunk} queries", "give a positive number of queries")

    @property
    def needs(self) -> frozenset:
        """Images; and the stock images (whose run records the stock maps) when comparing against them."""
        return frozenset({"images", "baseline"} if self.compare_stock else {"images"})

    def summary_keys(self, job) -> list[str]:
        keys = [f"{self.name}/{k}" for k in self.SUMMARY]
        if self.compare_stock:  # a stock job compares with itself (1, 1), so a sweep's jobs all report the keys
            keys += [f"{self.name}/{k}_stock" for k in self.VS_STOCK]
        if job_scenes(job):  # prompts from the toy world: scores against the objects' masks
            keys += [f"{self.name}/{k}" for k in GROUND_TRUTH_STATS]
        return keys

    def validate(self, job) -> None:
        super().validate(job)
        if self.steps is not None:
            require(max(self.steps) < job.sampler.steps, "metrics.word_maps.steps",
                    f"step {max(self.steps)} is past the sampler's {job.sampler.steps} steps",
                    f"give steps below {job.sampler.steps}")
        require(job.sampler.compile is not True, "metrics.word_maps", "compiled DiT blocks ignore a swapped "
                "attention processor, so word maps cannot be recorded", "set sampler.compile=false (or auto on CPU)")

    # ---- recording
    @contextmanager
    def recording(self, ctx, kind: str, p: int, seeds: list[int]) -> Iterator[None]:
        transformer = ctx.model.transformer
        blocks = checked_blocks(transformer, self.blocks, "metrics.word_maps.blocks")
        h, w = latent_grid(ctx.job.sampler, ctx.model)
        sink = MapSink(ctx.denoise, self.blocks, self.steps, h * w, ctx.job.sampler.steps, seeds, self.chunk)
        with probing(ctx.intervention_context(), "dit_attention", "word_maps",
                     lambda old, i: TextAttentionProcessor(old, sink, i), at=range(len(blocks)),
                     key=f"metrics.{self.name}"):  # a named probe at each DiT block (Session.attached() lists it)
            yield
        store = ctx.cache.setdefault((self.name, kind), {})
        mask = ctx.encoded.mask[p]
        for seed, maps in sink.means().items():
            store[(p, seed)] = valid_columns(maps, mask)
            if kind == "stock":  # shared by the sweep's jobs, like the stock image itself
                self.save_stock(ctx, (p, seed), store[(p, seed)])

    def stock_file(self, ctx, key: tuple[int, int]):
        """Where the stock run's maps for (prompt, seed) are kept: beside the cached stock image, keyed by it and by
        what this metric aggregates (blocks, steps)."""
        import hashlib

        base = ctx.stock_key(ctx.job.prompts[key[0]], key[1])
        what = hashlib.sha1(json.dumps([self.name, self.blocks, self.steps]).encode()).hexdigest()[:8]
        return ctx.baseline_folder / f"{base}.{self.name}-{what}.safetensors"

    def save_stock(self, ctx, key, maps: torch.Tensor) -> None:
        from ..files import save_verified

        save_verified(self.stock_file(ctx, key), {"maps": maps})

    def recorded(self, ctx, kind: str, keys: list[tuple[int, int]]) -> dict:
        """The `kind` run's token maps for `keys`; generated again (with recording) where the run came from a cache."""
        store = ctx.cache.setdefault((self.name, kind), {})
        for k in keys:
            if k not in store and kind == "stock":
                from ..files import load_verified

                saved = load_verified(self.stock_file(ctx, k))
                if saved is not None and "maps" in saved:
                    store[k] = saved["maps"]
        missing = [k for k in keys if k not in store]
        if missing:
            log.info("word_maps: regenerating %d %s image(s) to record their maps (they came from the cache)",
                     len(missing), kind)
            images = ctx.generate(missing, kind == "job", f"word maps ({kind})")
            reference = ctx.images if kind == "job" else ctx.baseline_images
            for k in missing:  # the recording run must be the run the job reports
                if k in reference and not np.array_equal(images[k], reference[k]):
                    raise RuntimeError(f"word_maps: the {kind} image {k} came out different when regenerated")
        return {k: store[k] for k in keys}

    # ---- summaries
    def compute(self, ctx: JobContext) -> MetricOutput:
        from ..prompts import body_and_tail

        keys = sorted(ctx.images)
        mine = self.recorded(ctx, "stock" if ctx.job.is_stock else "job", keys)
        stock = self.recorded(ctx, "stock", keys) if self.compare_stock else None
        grid = latent_grid(ctx.job.sampler, ctx.model)
        size = (ctx.job.sampler.height, ctx.job.sampler.width)
        rows, arrays, images = [], {}, {}
        words_by_prompt = {}
        scenes, scored = job_scenes(ctx.job), []
        for p in sorted({p for p, _ in keys}):
            n_content = int(ctx.encoded.index(p).content.sum())
            text = body_and_tail(ctx.job.prompts[p])[0]
            spans = content_token_spans(ctx.model.tokenizer, ctx.job.prompts[p], n_content)
            words_by_prompt[p] = words_of(text, spans)
            arrays[f"p{p:02d}.words"] = np.array(words_by_prompt[p][0], dtype=str)
        for p, seed in keys:
            words, members = words_by_prompt[p]
            tag = f"p{p:02d}_s{seed}"
            token_maps = mine[(p, seed)]
            grid_maps = word_grid_maps(token_maps, members, grid)
            arrays[f"{tag}.tokens"] = token_maps.numpy()
            arrays[f"{tag}.grid"] = grid_maps
            if self.upsample:
                arrays[tag] = upsample(grid_maps, size)
            n_content = int(ctx.encoded.index(p).content.sum())
            per_word = []
            for i, word in enumerate(words):
                stats = {"word": word, **map_stats(grid_maps[i])}
                if stock is not None:
                    ref = word_grid_maps(stock[(p, seed)], [members[i]], grid)[0]
                    stats |= {f"{k}_stock": v for k, v in compare_maps(grid_maps[i], ref).items()}
                per_word.append(stats)
            row = {"prompt_idx": p, "seed": seed, "words": len(words),
                   "text_share": float(token_maps[:, :n_content].sum(-1).mean())}
            if scenes:  # each word that names one object: pointing game and mask IoU against its mask
                truth = score_named_maps(words, grid_maps, scenes[p])
                for stats in per_word:
                    if stats["word"] in truth:
                        stats |= {"pointing": truth[stats["word"]]["pointing"], "mask_iou": truth[stats["word"]]["iou"]}
                scored += truth.values()
                row |= mean_scores(list(truth.values()))
            for k in ("share", "entropy", "area") + (tuple(f"{k}_stock" for k in self.VS_STOCK) if stock else ()):
                row[k] = float(np.mean([w[k] for w in per_word])) if per_word else 0.0
            row["per_word"] = json.dumps(per_word)
            rows.append(row)
            if seed == ctx.job.seeds[0]:
                from .figures import word_map_grid

                images[f"word_maps/p{p:02d}"] = (
                    word_map_grid(ctx.images[(p, seed)], upsample(grid_maps, size), words,
                                  f"word maps · prompt {p} · seed {seed}"),
                    f"{ctx.job.prompts[p][:80]} | attention of image tokens on each word (mean over heads, blocks, "
                    f"steps)")
        summary = {f"{self.name}/{k}": float(np.mean([r[k] for r in rows])) for k in self.SUMMARY}
        if stock is not None:
            summary |= {f"{self.name}/{k}_stock": float(np.mean([r[f'{k}_stock'] for r in rows]))
                        for k in self.VS_STOCK}
        if scenes:
            summary |= {f"{self.name}/{k}": v for k, v in mean_scores(scored).items()}
        return MetricOutput(summary=summary, rows=rows, arrays=arrays, images=images)


def load_word_maps(job_dir, prompt: int, seed: int, resolution: str = "image") -> tuple[list[str], np.ndarray]:
    """(words, maps) from a finished job's arrays: maps [words, H, W] (`image`) or [words, h, w] (`grid`)."""
    from pathlib import Path

    arrays = Path(job_dir) / "arrays"
    words = [str(w) for w in np.load(arrays / f"word_maps.p{prompt:02d}.words.npy")]
    suffix = "" if resolution == "image" else ".grid"
    return words, np.load(arrays / f"word_maps.p{prompt:02d}_s{seed}{suffix}.npy")

