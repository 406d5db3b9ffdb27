"""`python run.py --help`: what a newcomer needs on one screen, rendered into Hydra's `hydra.help.template`.

Hydra's own help lists every group option, internal ones included (`model: _variant`), and nothing about presets.
This one is read from `conf/` when asked for, so a new option or preset shows up without editing the help: the config
groups with their options (files starting with `_` are internal), each experiment preset and Optuna search with its
`# help:` line (else the first sentence of its header comment), the launchers, and three example commands.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESET_GROUPS = ("experiment", "hparams_search")  # added with `+group=NAME`, not in the defaults list

EXAMPLES = [
    ("python run.py", "one job: the toy Turbo (synthetic), 4 toy-world prompts, image stats"),
    ("python run.py -m +experiment=solo_sweep", "a preset sweep (one job per slot), then: krea-collect outputs/solo_sweep"),
    ("python run.py -m intervention=rebalance intervention.strength=0.5,1,2 'metrics=[image_stats,cond_shift]'",
     "your own sweep axis"),
]


def options(group: str, conf_dir: Path = CONF) -> list[str]:
    """A config group's user-facing options (`_variant.yaml` and the like are internal)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml") if not p.stem.startswith("_"))


def groups(conf_dir: Path = CONF) -> list[str]:
    return sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in ("hydra", *PRESET_GROUPS))


def one_line(path: Path, width: int = 96) -> str:
    """A preset's `# help: …` comment line, else the first sentence of its header comment, shortened to `width`."""
    text = []
    header = path.read_text().splitlines()
    marked = next((ln.split(":", 1)[1].strip() for ln in header if ln.startswith("# help:")), None)
    if marked:
        return marked if len(marked) <= width else marked[: width - 1].rstrip() + "…"
    for line in header:
        if line.startswith("# @package"):
            continue
        if not line.startswith("#") or line.lstrip("# ").startswith("python "):
            break
        text.append(line.lstrip("#").strip())
    sentence = re.split(r"(?<=[.!?])\s|\s—\s", " ".join(text), maxsplit=1)[0].strip()
    sentence = re.sub(r"^Card:\s*", "", sentence)
    return sentence if len(sentence) <= width else sentence[: width - 1].rstrip() + "…"


def render(conf_dir: Path = CONF) -> str:
    lines = ["krea_sweeps: config-driven sweeps over Krea 2's text conditioning (hooks on diffusers' Krea2Pipeline).",
             "Without real weights (KREA2_RAW_PATH, KREA2_TURBO_PATH, or model.path=…) it runs a tiny synthetic Krea 2.",
             "", "Usage: python run.py [-m] [group=option ...] [key=value ...]   (-m: one job per combination)", "",
             "Config groups (group=option):"]
    names = groups(conf_dir)
    width = max(len(g) for g in names + ["hydra/launcher"]) + 2
    for group in names:
        wrapped = textwrap.wrap(", ".join(options(group, conf_dir)), 100 - width)
        lines += [f"  {(group if i == 0 else ''):<{width}}{text}" for i, text in enumerate(wrapped)]
    lines.append(f"  {'hydra/launcher':<{width}}{', '.join(options('hydra/launcher', conf_dir))}"
                 "   (default: all jobs in this process)")
    for group, title in (("experiment", "Experiment presets (python run.py -m +experiment=NAME)"),
                         ("hparams_search", "Optuna searches (python run.py -m +hparams_search=NAME)")):
        presets = options(group, conf_dir)
        if not presets:
            continue
        lines += ["", f"{title}:"]
        w = max(len(p) for p in presets) + 2
        lines += [f"  {p:<{w}}{one_line(conf_dir / group / f'{p}.yaml')}" for p in presets]
    lines += ["", "Examples:"]
    for command, what in EXAMPLES:
        lines += [f"  {command}", f"      {what}"]
    lines += ["", "Every key: python run.py --cfg job    Hydra's own flags: python run.py --hydra-help",
              "Docs: README.md and docs/ (configuration, interventions, metrics, sweeps, W&B)."]
    return "\n".join(lines).replace("$", "$$")  # Hydra renders the template with string.Template


def help_resolver() -> str:
    return render()
