"""The tests a user writes for their op and metric, on the synthetic Krea 2 (CPU, seconds): `pytest examples/`."""
import math

import torch
from clip_states import ClipStates

from krea_sweeps.interventions import InterventionContext, applied
from krea_sweeps.models import LoadedModel, ModelVariant
from krea_sweeps.prompts import EncodeCache

MODEL = LoadedModel(ModelVariant(name="turbo", base="turbo", is_distilled=True, steps=8, guidance=0.0))
PROMPTS = ["a red fox in fresh snow", "a lighthouse at dusk"]


def fused(interventions=()):
    enc = EncodeCache(None).get(MODEL, PROMPTS, 64)
    with torch.no_grad(), applied(list(interventions), InterventionContext(text_path=MODEL.text_path)):
        return MODEL.text_path(enc.taps, enc.mask), enc


def test_no_limit_is_bit_identical():
    assert torch.equal(fused([ClipStates(site="slots", limit=math.inf)])[0], fused()[0])


def test_clip_at_taps_is_the_text_path_on_clipped_taps():
    got, enc = fused([ClipStates(site="taps", limit=0.05)])
    with torch.no_grad():
        expected = MODEL.text_path(enc.taps.clamp(-0.05, 0.05), enc.mask)  # computed without any hook
    assert torch.equal(got, expected) and not torch.equal(got, fused()[0])
