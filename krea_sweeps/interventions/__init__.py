"""Interventions (config group `intervention`, list `interventions`): levers on Krea 2's text path.

An intervention is data — (site, op, gates): a site of the registry (`sites.SITES`), an op (`hooks.Op`, a pure
function of the states, the call's generation state and its parameters) and gates (CFG branch `apply_to`: cond |
uncond | both, denoising-step window `steps: [start, end)`). What it learns from reference prompts is computed by an
explicit `fit` before the run (`fit_all`); `attach` (one generic `hooks.attach`) installs the op as named hooks on
the cached model and removes them exactly on exit (also when the job raises), so the next job of a sweep sees the
stock model bit for bit.

One intervention per job comes from the group (`intervention=solo intervention.slot=6`); several compose, applied
in order after it, through the top-level list (quote it for the shell)::

    python run.py intervention=solo intervention.layer=20 \\
        'interventions=[{_target_: krea_sweeps.interventions.Knockout, keys: [L20], blocks: [0]}]'

Projector-site edits compose on the weight in that order (w' = f_n(…f_1(w))); see docs/interventions.md.
Errors name the real config key (`interventions[1].slot` for list entries).

Slots/taps are addressed by index (`6`) or encoder layer (`L20` in lists, `layer: 20` for one slot).
"""

from .attention import Knockout
from .lens import Lens
from .patch import Patch
from .base import (Intervention, InterventionContext, NoIntervention, applied, describe_all, fit_all, keyed,
                   validate_all)
from .hooks import Call, HookRegistry, Op, attach, capture, check_accepts
from .sites import SITES, Site, register_site
from .projector import DIFF_KEY, PRESETS, LayerGains, LeaveOneOut, LoraFile, Rebalance, Solo
from .steer import Steer
from .taps import Ablate, TapScale

__all__ = [
    "Intervention", "InterventionContext", "NoIntervention", "applied", "describe_all", "fit_all", "keyed",
    "validate_all", "Op", "Call", "HookRegistry", "attach", "capture", "check_accepts", "SITES", "Site",
    "register_site",
    "LayerGains", "Solo", "LeaveOneOut", "Rebalance", "LoraFile", "TapScale", "Ablate", "Knockout", "Steer", "Lens", "Patch",
    "DIFF_KEY", "PRESETS",
]
