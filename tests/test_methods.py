"""Word maps, concept maps, Diffusion Lens, causal tracing and attribution patching on the synthetic Krea 2, each
against an independent computation. Generations are 64² (a 4×4 latent grid), 2 steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krea_sweeps.interventions import InterventionContext, applied
from krea_sweeps.prompts import encode, encode_cache
from krea_sweeps.sampler import DenoiseState, Sampler, generate_many
from krea_sweeps.synthetic import SELECT_LAYERS

MSL = 32
PROMPTS = ["a red fox in the snow", "two cups of coffee on a wooden table"]


def enc(model, prompts, layers=None):
    return encode_cache(None).get(model, prompts, MSL, layers)


def context(model, prompts=PROMPTS, state=None) -> InterventionContext:
    return InterventionContext(text_path=model.text_path, encode=lambda ps: enc(model, ps), num_steps=8,
                               state=state or DenoiseState(), prompts=[*prompts, ""],
                               encode_layers=lambda ps, layers: enc(model, ps, layers))


def fused(model, interventions=(), prompts=PROMPTS, encoded=None):
    e = encoded if encoded is not None else enc(model, prompts)
    with torch.no_grad(), applied(list(interventions), context(model, prompts)):
        return model.text_path(e.taps, e.mask)


def images(model, prompt, seeds=(0,), interventions=(), fast=True, **kw):
    pipe = model.pipeline()
    sampler = Sampler(steps=2, max_sequence_length=MSL, fast=fast, **kw).resolved(model.variant)
    cond, neg = enc(model, [prompt]), enc(model, [""])
    with applied(list(interventions), context(model, [prompt])):
        return generate_many(pipe, sampler, cond, neg, list(seeds))


# ------------------------------------------------------------------------------------------------------------ lens
@pytest.mark.parametrize("tap", [0, 6, 11])
def test_lens_identity_is_bit_identical(turbo, tap):
    from krea_sweeps.interventions import Lens

    lens = Lens(layer=SELECT_LAYERS[tap], tap=tap)
    assert torch.equal(fused(turbo, [lens]), fused(turbo))
    if tap == 6:
        for fast in (True, False):
            a = images(turbo, PROMPTS[0], fast=fast)[0]
            b = images(turbo, PROMPTS[0], interventions=[lens], fast=fast)[0]
            assert np.array_equal(a, b)


@pytest.mark.parametrize("layer,tap", [(0, None), (13, None), (36, None), (30, 3)])
def test_lens_feeds_the_encoder_layer_into_the_taps(turbo, layer, tap):
    from krea_sweeps.interventions import Lens

    # Independent: encode with the layer itself tapped where the lens puts it, then run the stock text path.
    layers = tuple(layer if (tap is None or k == tap) else SELECT_LAYERS[k] for k in range(12))
    from krea_sweeps.prompts import Encoded

    direct = Encoded.cat([encode(turbo.tokenizer, turbo.text_encoder, [p], MSL, layers) for p in PROMPTS])
    expected = fused(turbo, encoded=direct)
    got = fused(turbo, [Lens(layer=layer, tap=tap)])
    assert torch.equal(got, expected)
    assert not torch.equal(got, fused(turbo))


def test_lens_bad_input():
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.interventions import Lens

    for kw, key in [({"layer": 37}, "intervention.layer"), ({"layer": -1}, "intervention.layer"),
                    ({"layer": 3, "tap": 12}, "intervention.tap"), ({}, "intervention.layer")]:
        with pytest.raises(ConfigError) as info:
            Lens(**kw)
        assert info.value.key == key
