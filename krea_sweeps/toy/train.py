"""Train the toy Krea 2 on the toy world: `python -m krea_sweeps.toy.train [--out DIR]`.

Three stages, each deterministic (seeded generators, fixed thread count), on CPU:
1. VAE (`AutoencoderKLQwenImage`, tiny) as an autoencoder on rendered scenes. Random 32×32 crops: the VAE is
   convolutional, so crops teach it the same local job at a quarter of the cost. Its latent mean/std per channel go
   into its config (`latents_mean` / `latents_std`), where Krea2Pipeline reads them.
2. Raw DiT (`Krea2Transformer2DModel`): Krea 2's rectified-flow objective (x_σ = (1−σ)·x0 + σ·ε, target ε − x0, the
   transformer sees σ as its timestep) through the full text path — frozen tiny Qwen3-VL taps → text_fusion (trained,
   projector frozen at the published Raw weights) → txt_in → blocks — with 10% caption dropout to the empty prompt,
   which is what Krea2Pipeline's CFG uses as the negative.
3. Turbo: Raw's weights with the published Turbo projector, fine-tuned by guidance distillation: at σ on the 8-step
   Turbo grid (mu = 1.15), the student without CFG learns where the Raw teacher's CFG trajectory (cond +
   g·(cond − uncond), a few Euler substeps) is at the grid's next σ. So Turbo samples in few steps with no CFG, as the
   real one does (the real one is TDM-distilled; this is the cheap stand-in that works on a CPU).

The text encoder is `synthetic.build_text_encoder()` (seeded, frozen, never trained); its state hash is recorded so a
torch whose RNG builds a different encoder is caught at load time instead of silently mismatching the DiT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world

TRAIN_VERSION = "toy-train-v2"
WEIGHTS_DIR = Path(__file__).parent / "weights"
Z_DIM = 8
VAE_CONFIG = dict(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
TRANSFORMER_CONFIG = dict(
    in_channels=4 * Z_DIM, num_layers=3, attention_head_dim=16, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=192, timestep_embed_dim=64, text_hidden_dim=32, num_text_layers=12, text_num_attention_heads=2,
    text_num_key_value_heads=2, text_intermediate_size=96, num_layerwise_text_blocks=2, num_refiner_text_blocks=2,
    axes_dims_rope=(4, 6, 6),
)
# Everything that decides the weights. Changing any of it changes the hash in the manifest.
RECIPE = dict(
    seed=0, threads=1, scenes=3000, max_sequence_length=40,
    vae_steps=400, vae_batch=16, vae_lr=2e-3, vae_kl=1e-6, vae_crop=32,
    dit_steps=6000, dit_batch=64, dit_repeats=4, dit_lr=2e-3, caption_dropout=0.1,
    turbo_steps=300, turbo_lr=5e-4, turbo_guidance=4.5, turbo_grid_steps=8, turbo_mu=1.15, turbo_substeps=4,
)


# ------------------------------------------------------------------------------------------------------ helpers
def conv2d_for_single_frames():
    """A single image through Qwen-Image's causal Conv3d only ever meets the kernel's last time slice (the two frames
    before it are causal zero padding), so a Conv2d with that slice is the same math at a third of the cost. Used
    while training only; the saved VAE is the real class and runs its real forward."""
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as q

    original = q.QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if x.shape[2] == 1 and (cache_x is None or self._padding[4] == 0):
            y = F.conv2d(F.pad(x[:, :, 0], self._padding[:4]), self.weight[:, :, -1], self.bias, self.stride[1:])
            return y.unsqueeze(2)
        return original(self, x, cache_x)

    q.QwenImageCausalConv3d.forward = forward
    return lambda: setattr(q.QwenImageCausalConv3d, "forward", original)


def images_tensor(scenes) -> torch.Tensor:
    """[N, 3, 1, H, W] in [-1, 1], the layout the Qwen-Image VAE takes."""
    arr = np.stack([s.render() for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).unsqueeze(2).contiguous()


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def optimizer_step(opt, params, loss, bar) -> None:
    """One step of every stage: clipped gradients (the tiny blocks spike early), loss on the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.update(1)


def cosine_lr(opt, step: int, total: int, base: float, warmup: int = 50) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in opt.param_groups:
        group["lr"] = lr


def progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------ stage 1
def sub_block_colours(x: torch.Tensor) -> torch.Tensor:
    """[B, h, w, 12]: each 8×8 patch's four 4×4 sub-block colours."""
    sub = F.avg_pool2d(x[:, :, 0], 4)  # [B, 3, H/4, W/4]
    b, c, h, w = sub.shape
    return sub.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2, w // 2, c * 4)


def code_basis(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The world's principal components of sub-block colours, whitened: (mean [12], map [12, Z_DIM])."""
    blocks = sub_block_colours(images).reshape(-1, 12).double()
    mean = blocks.mean(0)
    values, vectors = torch.linalg.eigh(torch.cov((blocks - mean).T))
    top = torch.argsort(values, descending=True)[:Z_DIM]
    vectors = vectors[:, top] * torch.sign(vectors[:, top].sum(0, keepdim=True))  # a fixed sign per component
    return mean.float(), (vectors / values[top].clamp_min(1e-4).sqrt()).float()  # clamp: tiny test recipes


def target_code(x: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A fixed code for each 8×8 patch: the whitened principal components of its four 4×4 sub-block colours,
    [B, Z, 1, h, w].

    Trained end to end from scratch, this tiny Qwen-Image VAE collapses to the mean image within a few hundred steps
    (every block RMS-normalises each pixel's channel vector, so codes that differ by magnitude, e.g. gray vs black,
    look alike to the decoder). A fixed code avoids that: the encoder and the decoder are first fitted to it
    separately (two plain regressions), then the decoder to the encoder's actual outputs. *Which* code decides what
    the DiT learns: whitened, the background's brightness (86% of the world's colour variance) is one channel of eight
    and the object's colour and outline the others, so after Krea2Pipeline's per-channel normalisation the DiT's loss
    weighs the object as much as the background (v1's random Fourier features left the background dominant, and lost
    two thirds of object colours in the VAE alone)."""
    mean, whiten = basis
    return ((sub_block_colours(x) - mean) @ whiten).permute(0, 3, 1, 2).unsqueeze(2)


def train_vae(images: torch.Tensor, gen: torch.Generator):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(RECIPE["seed"])
    vae = AutoencoderKLQwenImage(**VAE_CONFIG)
    basis = code_basis(images)
    encoder = [p for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv."))]
    decoder = [p for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    c, n, steps = RECIPE["vae_crop"], images.shape[0], RECIPE["vae_steps"]
    stages = (("VAE encoder → code", encoder, "encoder"), ("VAE decoder ← code", decoder, "decoder"),
              ("VAE decoder ← encoder", decoder, "joint"))
    for desc, params, mode in stages:
        opt = torch.optim.AdamW(params, lr=RECIPE["vae_lr"], weight_decay=0.0)
        bar = progress(steps, desc)
        for step in range(steps):
            idx = torch.randint(n, (RECIPE["vae_batch"],), generator=gen)
            y0, x0 = (int(v) * 8 for v in torch.randint((world.SIZE - c) // 8 + 1, (2,), generator=gen))
            x = images[idx, :, :, y0 : y0 + c, x0 : x0 + c]
            code = target_code(x, basis)
            if mode == "encoder":
                posterior = vae.encode(x).latent_dist
                loss = F.mse_loss(posterior.mean, code) + RECIPE["vae_kl"] * posterior.kl().mean()
            else:
                if mode == "joint":
                    with torch.no_grad():
                        code = vae.encode(x).latent_dist.mean
                loss = F.mse_loss(vae.decode(code).sample, x)
            cosine_lr(opt, step, steps, RECIPE["vae_lr"], warmup=20)
            optimizer_step(opt, params, loss, bar)
        bar.close()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """Posterior means [N, Z, h, w] of every training image."""
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean[:, :, 0] for i in range(0, len(images), batch)])


def with_latent_stats(vae, latents: torch.Tensor):
    """The same VAE with its config's latents_mean / latents_std set from the data (what Krea2Pipeline reads)."""
    from diffusers import AutoencoderKLQwenImage

    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    out = AutoencoderKLQwenImage(**VAE_CONFIG, latents_mean=[round(float(v), 6) for v in mean],
                                 latents_std=[round(float(v), 6) for v in std])
    out.load_state_dict(vae.state_dict())
    return out.eval().requires_grad_(False)


def normalise(vae, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return (latents - mean) / std


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Krea2Pipeline._pack_latents (patch 2): [B, C, H, W] → [B, (H/2)(W/2), 4C]."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


# ------------------------------------------------------------------------------------------------------ stage 2
def encode_captions(captions: list[str]):
    """Taps [U, T, 12, D] and masks [U, T] of every distinct caption and the empty prompt, as Krea 2 encodes them,
    with the padding dropped (valid tokens first): what the sampler's `trim_padding` feeds the DiT, the same math
    as the padded sequence (text_fusion has no positions; padded tokens are only ever masked keys)."""
    from ..prompts import encode
    from ..synthetic import SELECT_LAYERS, build_text_encoder
    from ..tokenizer import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer()
    encoder = build_text_encoder().requires_grad_(False)
    taps, masks = [], []
    for i in range(0, len(captions), 128):
        enc = encode(tokenizer, encoder, captions[i : i + 128], RECIPE["max_sequence_length"], SELECT_LAYERS)
        taps.append(enc.taps)
        masks.append(enc.mask)
    taps, masks = torch.cat(taps), torch.cat(masks)
    length = int(masks.sum(1).max())
    order = torch.argsort((~masks).to(torch.int8), dim=1, stable=True)[:, :length]  # valid tokens first, in order
    taps = torch.gather(taps, 1, order[:, :, None, None].expand(-1, -1, *taps.shape[2:]))
    masks = torch.gather(masks, 1, order)
    return taps.contiguous(), masks, state_hash(encoder.state_dict())


@contextmanager
def text_fusion_once_per_caption(model, repeats: int):
    """Training batches hold each caption `repeats` times in a row (different noise and σ); text_fusion does not see
    the image, so it runs once per caption and its output is repeated — the same values and gradients, a quarter of
    the cost of the stage that dominates a tiny DiT's step."""
    fusion = model.text_fusion
    inner = fusion.forward

    def forward(hidden_states, attention_mask=None):
        mask = attention_mask[::repeats] if attention_mask is not None else None
        return inner(hidden_states[::repeats], attention_mask=mask).repeat_interleave(repeats, dim=0)

    fusion.forward = forward
    try:
        yield
    finally:
        del fusion.forward


def build_dit(variant: str):
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(RECIPE["seed"] + 1)
    model = Krea2Transformer2DModel(**TRANSFORMER_CONFIG)
    set_projector(model, variant)
    return model


def set_projector(model, variant: str) -> None:
    from ..synthetic import projector_values

    with torch.no_grad():
        model.text_fusion.projector.weight.copy_(torch.tensor(projector_values()[variant]).view(1, 12))
    model.text_fusion.projector.weight.requires_grad_(False)


def position_ids(text_len: int) -> torch.Tensor:
    from diffusers import Krea2Pipeline

    grid = world.SIZE // 16
    return Krea2Pipeline.prepare_position_ids(text_len, grid, grid, torch.device("cpu"))


def velocity(model, x, sigma, taps, mask):
    return model(hidden_states=x, encoder_hidden_states=taps, timestep=sigma, position_ids=position_ids(taps.shape[1]),
                 encoder_attention_mask=mask, return_dict=False)[0]


def train_raw(x0: torch.Tensor, caption_idx: torch.Tensor, taps, masks, empty: int, gen: torch.Generator):
    model = build_dit("raw").train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=RECIPE["dit_lr"], weight_decay=0.01)
    bar = progress(RECIPE["dit_steps"], "DiT (Raw)")
    r = RECIPE["dit_repeats"]
    for step in range(RECIPE["dit_steps"]):
        idx = torch.randint(len(x0), (RECIPE["dit_batch"] // r,), generator=gen)
        cap = caption_idx[idx].clone()
        cap[torch.rand(len(idx), generator=gen) < RECIPE["caption_dropout"]] = empty
        idx, cap = idx.repeat_interleave(r), cap.repeat_interleave(r)
        x, noise = x0[idx], torch.randn(x0[idx].shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen))  # logit-normal, as in SD3-style training
        xt = (1 - sigma[:, None, None]) * x + sigma[:, None, None] * noise
        with text_fusion_once_per_caption(model, r):
            pred = velocity(model, xt, sigma, taps[cap], masks[cap])
        loss = F.mse_loss(pred, noise - x)
        cosine_lr(opt, step, RECIPE["dit_steps"], RECIPE["dit_lr"])
        optimizer_step(opt, params, loss, bar)
    bar.close()
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ stage 3
def turbo_sigmas() -> torch.Tensor:
    """The σ at which Turbo's 8 steps evaluate the model (the pipeline's grid, shifted with mu = 1.15), then 0."""
    n, mu = RECIPE["turbo_grid_steps"], RECIPE["turbo_mu"]
    s = torch.from_numpy(np.linspace(1.0, 1 / n, n)).float()
    return torch.cat([math.exp(mu) / (math.exp(mu) + (1 / s - 1)), torch.zeros(1)])


@torch.no_grad()
def teacher_step_velocity(raw, xt, sigma, sigma_next, cond, blank, taps, masks, repeats: int):
    """The velocity that takes x_σ to where the Raw teacher's CFG trajectory is at the next grid σ, integrated with
    `turbo_substeps` Euler steps: (x_next − x_σ) / (σ_next − σ). With one substep it is the teacher's CFG velocity
    itself; more substeps let the student learn the teacher's 28-step path in the pipeline's 8 Euler steps, not
    just its direction at each σ (Turbo's few steps otherwise add the coarse grid's error to the student's)."""
    g, k = RECIPE["turbo_guidance"], RECIPE["turbo_substeps"]
    x = xt
    with text_fusion_once_per_caption(raw, repeats):
        for j in range(k):
            s = sigma + (sigma_next - sigma) * (j / k)
            s_next = sigma + (sigma_next - sigma) * ((j + 1) / k)
            c = velocity(raw, x, s, taps[cond], masks[cond])
            u = velocity(raw, x, s, taps[blank], masks[blank])
            x = x + (s_next - s)[:, None, None] * (c + g * (c - u))
    return (x - xt) / (sigma_next - sigma)[:, None, None]


def train_turbo(raw, x0, caption_idx, taps, masks, empty: int, gen: torch.Generator):
    import copy

    student = copy.deepcopy(raw).train()
    set_projector(student, "turbo")
    for name, p in student.named_parameters():
        p.requires_grad_(name != "text_fusion.projector.weight")
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=RECIPE["turbo_lr"], weight_decay=0.0)
    grid = turbo_sigmas()
    bar = progress(RECIPE["turbo_steps"], "Turbo (distil)")
    r = RECIPE["dit_repeats"]
    for step in range(RECIPE["turbo_steps"]):
        idx = torch.randint(len(x0), (RECIPE["dit_batch"] // r,), generator=gen).repeat_interleave(r)
        cap, blank = caption_idx[idx], torch.full_like(idx, empty)
        x, noise = x0[idx], torch.randn(x0[idx].shape, generator=gen)
        at = torch.randint(len(grid) - 1, (len(idx),), generator=gen)
        sigma, sigma_next = grid[at], grid[at + 1]
        xt = (1 - sigma[:, None, None]) * x + sigma[:, None, None] * noise
        target = teacher_step_velocity(raw, xt, sigma, sigma_next, cap, blank, taps, masks, r)
        with text_fusion_once_per_caption(student, r):
            loss = F.mse_loss(velocity(student, xt, sigma, taps[cap], masks[cap]), target)
        cosine_lr(opt, step, RECIPE["turbo_steps"], RECIPE["turbo_lr"], warmup=20)
        optimizer_step(opt, params, loss, bar)
    bar.close()
    return student.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ main
def save(out: Path, vae, raw, turbo, manifest: dict) -> dict:
    """DiTs in the original single-file (`txtfusion.*`) format, the VAE as safetensors + config, and a manifest
    with the recipe, the versions and the sha256 of every file."""
    from safetensors.torch import save_file

    from ..synthetic import diffusers_to_original

    out.mkdir(parents=True, exist_ok=True)
    save_file(diffusers_to_original(raw.state_dict()), str(out / "toy_raw.safetensors"))
    save_file(diffusers_to_original(turbo.state_dict()), str(out / "toy_turbo.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(out / "toy_vae.safetensors"))
    (out / "toy_vae_config.json").write_text(json.dumps(dict(vae.config), indent=1, default=list))
    (out / "toy_transformer_config.json").write_text(json.dumps(TRANSFORMER_CONFIG, indent=1))
    files = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in
             ("toy_raw.safetensors", "toy_turbo.safetensors", "toy_vae.safetensors")}
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    manifest = {**manifest, "files": files, "weights_sha256": combined}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def train(out: Path, overrides: dict | None = None) -> dict:
    """Train with RECIPE (plus `overrides`, for experiments and tests) and write the weights to `out`."""
    if (overrides or {}).get("turbo_substeps", 1) < 1:
        raise ValueError(f"turbo_substeps={overrides['turbo_substeps']}: the teacher needs at least 1 Euler substep "
                         "per Turbo grid step (4 is the recipe's)")
    saved = dict(RECIPE)
    RECIPE.update(overrides or {})
    try:
        return _train(out)
    finally:
        RECIPE.clear()
        RECIPE.update(saved)


def _train(out: Path) -> dict:
    torch.set_num_threads(RECIPE["threads"])
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    scenes = world.draw_scenes(RECIPE["seed"], RECIPE["scenes"], "train")
    images = images_tensor(scenes)
    restore = conv2d_for_single_frames()
    try:
        vae = train_vae(images, gen)
        latents = encode_latents(vae, images)
    finally:
        restore()
    t_vae = time.perf_counter() - t0
    vae = with_latent_stats(vae, latents)
    with torch.no_grad():  # reconstruction error on full-size training images, in [-1, 1] units
        vae_mse = float(F.mse_loss(vae.decode(latents[:200, :, None]).sample, images[:200]))
    print(f"VAE reconstruction MSE (64x64, [-1, 1]): {vae_mse:.4f}")
    x0 = pack(normalise(vae, latents))
    captions = sorted({s.caption for s in scenes})
    taps, masks, encoder_hash = encode_captions(captions + [""])
    row = {caption: i for i, caption in enumerate(captions)}
    caption_idx = torch.tensor([row[s.caption] for s in scenes])
    raw = train_raw(x0, caption_idx, taps, masks, len(captions), gen)
    t_raw = time.perf_counter() - t0 - t_vae
    turbo = train_turbo(raw, x0, caption_idx, taps, masks, len(captions), gen)
    elapsed = time.perf_counter() - t0
    import diffusers
    import transformers

    manifest = {"train_version": TRAIN_VERSION, "recipe": dict(RECIPE), "text_encoder_sha256": encoder_hash,
                "vae_reconstruction_mse": round(vae_mse, 5),
                "seconds": {"vae": round(t_vae, 1), "raw": round(t_raw, 1), "turbo": round(elapsed - t_vae - t_raw, 1),
                            "total": round(elapsed, 1)},
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "transformers": transformers.__version__, "numpy": np.__version__}}
    return save(out, vae, raw, turbo, manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help=f"where to write the weights ({WEIGHTS_DIR})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a recipe entry (for experiments; the committed weights use the defaults)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in RECIPE:
            raise SystemExit(f"--set {key}: not a recipe key ({', '.join(RECIPE)})")
        try:
            overrides[key] = type(RECIPE[key])(value)
        except ValueError:
            raise SystemExit(f"--set {key}={value}: not a {type(RECIPE[key]).__name__}") from None
    manifest = train(args.out, overrides)
    print(f"trained in {manifest['seconds']['total']:.0f}s: {args.out} weights_sha256 {manifest['weights_sha256']}")


if __name__ == "__main__":
    main()
