"""Interventions (config group `intervention`, list `interventions`): levers on Krea 2's text path.

An intervention is data — a site, an operation, parameters — plus `attach`, a context manager that installs its
hooks or weight edits on the cached model and removes them exactly on exit (also when the job raises), so the next
job of a sweep sees the stock model bit for bit.
"""

from .base import Intervention, InterventionContext, NoIntervention, applied, describe_all

__all__ = ["Intervention", "InterventionContext", "NoIntervention", "applied", "describe_all"]
