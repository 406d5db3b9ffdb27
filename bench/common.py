"""Shared by the benchmarks: the device in words, FLOP counting, JSON output, and the full-size random-weight Krea 2.

The real weights are out of reach on the benchmark machines, so `--full` builds diffusers' default
`Krea2Transformer2DModel` (12.8B), the Qwen3-VL-4B text model and Qwen-Image's VAE with random weights, directly on
the GPU (no CPU copy, no download): the arithmetic — and so the time — is the real model's, the pixels are not.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen3-VL-4B-Instruct's text tower (what Krea 2 taps); the vision tower is never run for text, so it is kept tiny.
QWEN3_VL_4B_TEXT = dict(
    hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=9728, vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=True,
    max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=2560,
                   deepstack_visual_indexes=[0], num_position_embeddings=16)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    return {"device": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()[0]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(out: list, device: torch.device):
    """Append the body's wall seconds to `out` (device-synchronised on both ends)."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t0)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


# ----------------------------------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's FLOP counter knows the CUDA attention kernels only; CPU's flash kernel does the same two matmuls."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


@contextmanager
def count_flops():
    """`with count_flops() as c: ...; c.total` — matmul/conv/attention FLOPs of everything run in the body."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        from torch.utils.flop_counter import shape_wrapper

        mapping[op.default] = shape_wrapper(_sdpa_cpu_flops)
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        yield counter


def write_json(data: dict, out: str | None, default_name: str) -> Path:
    path = Path(out) if out else REPO / "bench" / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


# ------------------------------------------------------------------------------------------ full-size Krea 2
@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _keep_norms_float32(module: torch.nn.Module) -> None:
    """diffusers keeps Krea 2's RMSNorm scales in float32 (`_keep_in_fp32_modules`); so does the random model."""
    for m in module.modules():
        if type(m).__name__ == "Krea2RMSNorm":
            m.float()


def build_full_transformer(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """diffusers' default `Krea2Transformer2DModel` (= Krea 2's DiT, 12.82B) with random weights made on `device`."""
    from diffusers import Krea2Transformer2DModel

    from krea_sweeps.synthetic import projector_values

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = Krea2Transformer2DModel()
    _keep_norms_float32(model)
    with torch.no_grad():
        model.text_fusion.projector.weight.copy_(torch.tensor(projector_values()["raw"]).view(1, 12))
    return model.eval().requires_grad_(False)


def build_full_text_encoder(device: torch.device, dtype: torch.dtype, seed: int = 1):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    config = Qwen3VLConfig(text_config=QWEN3_VL_4B_TEXT, vision_config=TINY_VISION)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen3VLModel(config)
    return model.eval().requires_grad_(False)


def build_full_vae(device: torch.device, dtype: torch.dtype, seed: int = 2):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = AutoencoderKLQwenImage()
    return model.eval().requires_grad_(False)


def full_parts(device: torch.device, dtype: torch.dtype) -> dict:
    """Tokenizer (Qwen's real BPE, from the synthetic cache), text encoder, DiT and VAE at full size."""
    from transformers import AutoTokenizer

    from krea_sweeps.synthetic import ensure_synthetic_checkpoints

    t0 = time.perf_counter()
    parts = {
        "tokenizer": AutoTokenizer.from_pretrained(str(ensure_synthetic_checkpoints() / "tokenizer")),
        "text_encoder": build_full_text_encoder(device, dtype),
        "transformer": build_full_transformer(device, dtype),
        "vae": build_full_vae(device, dtype),
    }
    sync(device)
    parts["build_s"] = time.perf_counter() - t0
    return parts


def pipeline_from(parts: dict, distilled: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    from krea_sweeps.synthetic import SCHEDULER_CONFIG, SELECT_LAYERS

    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=parts["vae"],
                         text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                         transformer=parts["transformer"], text_encoder_select_layers=SELECT_LAYERS,
                         is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
