"""Prompt sets (config group `prompts`) and encoding exactly as Krea 2 does it.

`encode` reproduces `Krea2Pipeline.get_text_hidden_states` token for token: the Qwen-Image template prefix, the
prompt padded to `max_sequence_length` (+ prefix − suffix), the 5-token suffix after the padding, positions that count
only real tokens (broadcast over the 3 mRoPE axes), the 12 tapped hidden states stacked, the prefix dropped. The prefix
length is measured with the tokenizer (34 for Qwen's) rather than trusted.

A prompt that starts with `<|im_start|>` takes the raw chat-template route: it is tokenized verbatim and cut at the
user turn (Krea 2 discards the system turn), so `<think>` blocks in the assistant turn reach the DiT. Its tail (from
the user turn's `<|im_end|>` on) replaces the suffix and is longer than 5 tokens, so each encoding carries its rows'
tail lengths (`Encoded.num_suffix`): the content tokens are the user text alone on both routes (`content_mask`).

Encoded taps are cached in memory and on disk (safetensors keyed by encoder identity + template + prompt + length):
each prompt is encoded once per sweep, not once per job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .configs import PromptFileFields, PromptSetFields
from .errors import ConfigError, require

log = logging.getLogger(__name__)

TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# Tokens of TEMPLATE_SUFFIX with Qwen's tokenizer (<|im_end|>, \n, <|im_start|>, assistant, \n): the tail length of an
# encoding made without a tokenizer at hand (e.g. `Encoded(taps, mask)` built by hand for the standard template).
STANDARD_SUFFIX_TOKENS = 5
# Bump when what the encode cache stores changes, so older files are re-encoded rather than misread.
ENCODE_CACHE_FORMAT = 3
USER_TURN = "<|im_start|>user\n"
RAW_ROUTE_MARK = "<|im_start|>"


# ----------------------------------------------------------------------------------------------------- prompt sets
@dataclass
class PromptSet(PromptSetFields):
    """A named list of prompts (`conf/prompts/<name>.yaml`)."""

    def __post_init__(self):
        self.prompts = [str(p) for p in self.prompts]
        require(len(self.prompts) > 0, "prompts.prompts", f"prompt set {self.name!r} is empty",
                "give at least one prompt")
        for p in self.prompts:
            require(p.strip() != "", "prompts.prompts", f"prompt set {self.name!r} has an empty prompt",
                    "remove empty entries")

    def load(self) -> list[str]:
        return list(self.prompts)


@dataclass
class PromptFile(PromptFileFields, PromptSet):
    """One prompt per line; blank lines and `#` comments are skipped (`prompts=file prompts.path=...`)."""

    def __post_init__(self):
        require(self.path is not None, "prompts.path", "no prompt file given", "set prompts.path=/path/to/prompts.txt")
        file = Path(self.path).expanduser()
        require(not file.is_dir(), "prompts.path", f"{file} is a folder", "give a text file in it, one prompt a line")
        require(file.is_file(), "prompts.path", f"{file} does not exist", "give an existing text file, one prompt a line")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError("prompts.path", f"{file} is not UTF-8 text ({e.reason})", "save it as UTF-8") from None
        self.prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        require(len(self.prompts) > 0, "prompts.path", f"{file} holds no prompts",
                "write one prompt per line (lines starting with # are comments)")


# ------------------------------------------------------------------------------------------------------ encoding
@dataclass
class Encoded:
    """Tapped hidden states [B, T, 12, D] and the valid-token mask [B, T] of a batch of prompts (prefix dropped), with
    each row's tail length `num_suffix` [B] (the template suffix, or a raw prompt's assistant turn): the content
    tokens cannot be read off the mask alone, because a raw chat-template tail is longer than the standard 5.
    `num_suffix=None` means the standard template's suffix for every row."""

    taps: torch.Tensor
    mask: torch.Tensor
    num_suffix: torch.Tensor | None = None

    def __post_init__(self):
        rows = self.mask.shape[0]
        if self.num_suffix is None:
            self.num_suffix = torch.full((rows,), STANDARD_SUFFIX_TOKENS, dtype=torch.long)
        self.num_suffix = torch.as_tensor(self.num_suffix, dtype=torch.long).reshape(-1).cpu()
        if self.num_suffix.numel() == 1 and rows != 1:
            self.num_suffix = self.num_suffix.expand(rows).clone()
        if self.num_suffix.shape != (rows,):
            raise ValueError(f"num_suffix has shape {tuple(self.num_suffix.shape)} for {rows} rows")

    def index(self, i: int) -> "Encoded":
        return Encoded(self.taps[i : i + 1], self.mask[i : i + 1], self.num_suffix[i : i + 1])

    @property
    def content(self) -> torch.Tensor:
        """[B, T] bool: the content tokens of each row (`content_mask`)."""
        return content_mask(self.mask, self.num_suffix)

    @staticmethod
    def cat(parts: list["Encoded"]) -> "Encoded":
        return Encoded(torch.cat([e.taps for e in parts]), torch.cat([e.mask for e in parts]),
                       torch.cat([e.num_suffix for e in parts]))


def prefix_length(tokenizer) -> int:
    """Token count of the template prefix (34 with Qwen's tokenizer; the pipeline hard-codes it)."""
    return len(tokenizer(TEMPLATE_PREFIX).input_ids)


def is_raw_route(prompt: str) -> bool:
    return prompt.lstrip().startswith(RAW_ROUTE_MARK)


def split_raw_chat(prompt: str) -> tuple[str, str]:
    """Split a raw chat-template prompt into (user text, everything after the user turn's end).

    The system turn is discarded (Krea 2 supplies its own); the tail — `<|im_end|>\\n<|im_start|>assistant\\n…` with
    any `<think>` block — replaces the standard suffix, so it sits after the padding as the suffix does.
    """
    start = prompt.find(USER_TURN)
    if start < 0:
        raise ConfigError("prompts", f"raw chat prompt has no user turn: {prompt[:60]!r}",
                          f"include '{USER_TURN.strip()}' followed by the prompt")
    body = prompt[start + len(USER_TURN) :]
    end = body.find("<|im_end|>")
    if end < 0:
        return body, TEMPLATE_SUFFIX
    return body[:end], body[end:]


def body_and_tail(prompt: str) -> tuple[str, str]:
    """(the text padded like a prompt, the tail placed after the padding): the standard suffix, or a raw prompt's."""
    return split_raw_chat(prompt) if is_raw_route(prompt) else (prompt, TEMPLATE_SUFFIX)


def suffix_tokens(tokenizer, prompts: list[str], max_sequence_length: int | None = None) -> torch.Tensor:
    """[B] token count of each prompt's tail (5 for the standard suffix; more for a raw prompt's assistant turn).
    With `max_sequence_length`, a tail that leaves no room for the prompt is a config error."""
    counts = []
    for prompt in prompts:
        n = len(tokenizer(body_and_tail(prompt)[1]).input_ids)
        if max_sequence_length is not None:
            require(n < max_sequence_length, "sampler.max_sequence_length",
                    f"the raw prompt's tail after the user turn is {n} tokens, leaving no room for the prompt in "
                    f"{max_sequence_length}: {prompt[:60]!r}", f"raise sampler.max_sequence_length above {n}")
        counts.append(n)
    return torch.tensor(counts, dtype=torch.long)


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Input ids and mask in Krea 2's layout `[prefix | prompt | PAD | tail]`, and the prefix length to drop. Row i's
    tail is `suffix_tokens(...)[i]` tokens long; the prompt is truncated so the tail always fits."""
    prefix_idx = prefix_length(tokenizer)
    n_suffix = suffix_tokens(tokenizer, prompts, max_sequence_length)
    ids, masks = [], []
    for prompt, n in zip(prompts, n_suffix.tolist()):
        body, suffix = body_and_tail(prompt)
        text = tokenizer([TEMPLATE_PREFIX + body], truncation=True, padding="max_length",
                         max_length=max_sequence_length + prefix_idx - n, return_tensors="pt")
        tail = tokenizer([suffix], return_tensors="pt")
        ids.append(torch.cat([text.input_ids, tail.input_ids], dim=1))
        masks.append(torch.cat([text.attention_mask, tail.attention_mask], dim=1).bool())
    return torch.cat(ids), torch.cat(masks), prefix_idx


def truncated_tokens(tokenizer, prompts: list[str], max_sequence_length: int) -> list[int]:
    """How many tokens of each prompt's text do not fit in `max_sequence_length` (0 when it fits): `tokenize` cuts
    them, as Krea 2 does; the job reports them instead of dropping them silently."""
    prefix_idx = prefix_length(tokenizer)
    tails = suffix_tokens(tokenizer, prompts, max_sequence_length).tolist()
    out = []
    for prompt, tail in zip(prompts, tails):
        body_tokens = len(tokenizer(TEMPLATE_PREFIX + body_and_tail(prompt)[0]).input_ids) - prefix_idx
        out.append(max(0, body_tokens - (max_sequence_length - tail)))
    return out


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int,
           select_layers: tuple[int, ...]) -> Encoded:
    """`Krea2Pipeline.get_text_hidden_states`, with the prefix length measured and the raw chat route added."""
    input_ids, attention_mask, prefix_idx = tokenize(tokenizer, prompts, max_sequence_length)
    device = text_encoder.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    outputs = text_encoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           output_hidden_states=True)
    taps = torch.stack([outputs.hidden_states[i] for i in select_layers], dim=2)
    return Encoded(taps[:, prefix_idx:], attention_mask[:, prefix_idx:],
                   suffix_tokens(tokenizer, prompts, max_sequence_length))


def content_mask(mask: torch.Tensor, num_suffix: int | torch.Tensor = STANDARD_SUFFIX_TOKENS) -> torch.Tensor:
    """Content tokens [B, T]: the valid tokens minus each row's last `num_suffix` valid ones (its tail: the template
    suffix, or a raw prompt's assistant turn), i.e. the user text alone. `num_suffix` is an int or a [B] tensor
    (`Encoded.num_suffix`); counting valid tokens rather than positions keeps it right with or without padding."""
    valid_counts = mask.long().cumsum(-1)
    total = mask.long().sum(-1, keepdim=True)
    tail = torch.as_tensor(num_suffix, dtype=torch.long, device=mask.device).reshape(-1, 1)
    return mask.bool() & (valid_counts <= (total - tail))


class EncodeCache:
    """Each prompt encoded once: an in-memory dict in front of a safetensors file per prompt on disk."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder else None
        self.memory: dict[str, Encoded] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(identity: dict, prompt: str, max_sequence_length: int) -> str:
        blob = json.dumps({"enc": identity, "prefix": TEMPLATE_PREFIX, "suffix": TEMPLATE_SUFFIX, "prompt": prompt,
                           "len": max_sequence_length, "format": ENCODE_CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, model, prompts: list[str], max_sequence_length: int,
            layers: tuple[int, ...] | None = None) -> Encoded:
        """Encoded taps for `prompts` (batch in order), encoding only those not cached in memory or on disk.
        `layers` picks other encoder hidden states than Krea 2's 12 (0 = embeddings; the Diffusion Lens): they are
        cached the same way, under their own key, so a lens sweep encodes each (prompt, layer) once."""
        from .files import file_identity, load_verified, save_verified

        layers = tuple(model.variant.select_layers) if layers is None else tuple(int(x) for x in layers)
        identity = {"text_encoder": model.sources.text_encoder, "dtype": str(model.dtype), "layers": list(layers)}
        if not model.variant.synthetic:  # a replaced encoder under the same path must not hit the old entries
            identity["files"] = file_identity(model.sources.text_encoder)
        out = []
        for prompt in prompts:
            k = self.key(identity, prompt, max_sequence_length)
            if k not in self.memory:
                file = self.folder / f"{k}.safetensors" if self.folder else None
                t = load_verified(file, device=str(model.device)) if file is not None else None
                if t is not None and {"taps", "mask", "num_suffix"} <= set(t):
                    self.memory[k] = Encoded(t["taps"], t["mask"], t["num_suffix"])
                    self.hits += 1
                else:
                    self.misses += 1
                    enc = encode(model.tokenizer, model.text_encoder, [prompt], max_sequence_length, layers)
                    self.memory[k] = enc
                    if file is not None:
                        save_verified(file, {"taps": enc.taps, "mask": enc.mask, "num_suffix": enc.num_suffix})
            else:
                self.hits += 1
            out.append(self.memory[k])
        return Encoded.cat(out)
