"""Interventions (config group `intervention`, list `interventions`): levers on Krea 2's text path.

An intervention is data — a site, an operation, parameters — plus `attach`, a context manager that installs its
hooks on the cached model and removes them exactly on exit (also when the job raises), so the next job of a sweep
sees the stock model bit for bit. Edits are computed at forward time, so each one is gated by CFG branch
(`apply_to`: cond | uncond | both) and denoising-step window (`steps: [start, end)`).

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
from .base import Intervention, InterventionContext, NoIntervention, applied, describe_all, keyed, validate_all
from .projector import DIFF_KEY, PRESETS, LayerGains, LeaveOneOut, LoraFile, Rebalance, Solo
from .steer import Steer
from .taps import Ablate, TapScale

__all__ = [
    "Intervention", "InterventionContext", "NoIntervention", "applied", "describe_all", "keyed", "validate_all",
    "LayerGains", "Solo", "LeaveOneOut", "Rebalance", "LoraFile", "TapScale", "Ablate", "Knockout", "Steer", "Lens", "Patch",
    "DIFF_KEY", "PRESETS",
]
