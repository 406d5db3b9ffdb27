"""Entry point: compose (Hydra) → plan → execute → record. Everything else lives in `krea_sweeps/`.

    python run.py                                   # default job: synthetic Turbo, smoke prompts, W&B offline
    python run.py -m intervention=solo intervention.slot='range(0,12)'   # a sweep, one W&B run per job
"""

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from krea_sweeps.errors import ConfigError
from krea_sweeps.plan import register_resolvers
from krea_sweeps.process import defer_unused_imports

register_resolvers()
defer_unused_imports()
log = logging.getLogger("krea_sweeps")
# `hydra/launcher=ray` (ours) shares its name with the Ray plugin's schema, which validates it; Hydra 1.3 warns about
# that name match on every composition.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/ray' is validated against ConfigStore schema",
                        category=UserWarning)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from krea_sweeps.runner import run_job

    try:
        return run_job(cfg, HydraConfig.get())
    except ConfigError as e:
        discard_unused_job_dir(HydraConfig.get().runtime.output_dir)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def discard_unused_job_dir(path: str) -> None:
    """Hydra creates the job dir (and outputs/<name>/ above it) before the task runs; a job rejected at planning
    leaves nothing behind: the folders it made are removed while they are empty."""
    from pathlib import Path

    job_dir, top = Path(path).absolute(), Path.cwd().absolute()
    for folder in [job_dir, *job_dir.parents]:
        if folder == top or top not in folder.parents:
            break
        try:
            folder.rmdir()  # only ever an empty folder
        except OSError:
            break


def exit_with_failures() -> None:
    from krea_sweeps.session import current_session

    failed = current_session().failed_jobs
    if failed:
        print(f"{len(failed)} job(s) failed (see failed.json in each job dir; rerun the same command to "
              "retry only these):", file=sys.stderr)
        for line in failed:
            print(f"  - {line}", file=sys.stderr)
        sys.exit(1)


def run_command_line() -> None:
    from krea_sweeps.runner import FailFast, Interrupted
    from krea_sweeps.sweeps import preflight

    preflight(sys.argv[1:])  # unknown `+experiment=NAME` etc.: one line, before Hydra composes
    try:
        main()
    except (Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: Ctrl-C outside a job (between jobs)
        signame = getattr(e, "signame", "SIGINT")
        print(f"interrupted ({signame}): no partial result written; rerun the same command to resume "
              "(finished jobs are skipped)", file=sys.stderr)
        sys.exit(e.exit_code if isinstance(e, Interrupted) else 130)
    except FailFast as e:
        print(f"fail_fast: stopped at the first failed job: {e.line}", file=sys.stderr)
        sys.exit(1)
    exit_with_failures()


if __name__ == "__main__":
    from krea_sweeps.process import exit_now

    try:
        run_command_line()
    except SystemExit as e:  # every way out of a run, with its code: 0, 1 (failed jobs), 2 (bad config), 130/143
        exit_now(e.code)
    exit_now(0)
