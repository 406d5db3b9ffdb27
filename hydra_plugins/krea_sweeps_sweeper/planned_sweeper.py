"""Hydra accepts sweepers only from the `hydra_plugins` namespace: this is `krea_sweeps.sweeps.PlannedSweeper` there.
It is found because run.py's folder (the repository root) is on `sys.path`."""

from krea_sweeps.sweeps import PlannedSweeper as _PlannedSweeper


class PlannedSweeper(_PlannedSweeper):
    """See `krea_sweeps.sweeps.PlannedSweeper`."""
