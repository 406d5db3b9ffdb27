"""The README stays true: every command in its code blocks parses (composed, not run), its test command is the CI's,
it stays short, and every link into docs/ (from the README and from docs/ itself) resolves."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO

README = REPO / "README.md"
MAX_LINES = 150


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[list[str]]:
    """Each command line of the fenced code blocks as argv (continuations joined, comments and env prefixes
    dropped, `&&` chains split)."""
    out = []
    for block in code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s&&\s", line):
                argv = shlex.split(part, comments=True)
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes
                    argv = argv[1:]
                if argv:
                    out.append(argv)
    return out


def run_py_commands(text: str) -> list[list[str]]:
    return [argv[2:] for argv in commands(text) if argv[:2] in (["python", "run.py"], ["python3", "run.py"])]


def first_job_overrides(args: list[str]) -> list[str]:
    """The overrides of a command's first job: each sweep axis (`a,b`, `range(…)`) at its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from krea_sweeps.sweeps import _values

    overrides = [a for a in args if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.input_line.split('=', 1)[0]}={_values(o)[0]}" if o.is_sweep_override() else o.input_line
            for o in parsed]


def test_readme_is_short_and_names_nothing_outside_the_repository():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    for word in ("NOTES", "the issue", "P1", "P2", "P3", "P4", "seed's"):
        assert not re.search(rf"\b{re.escape(word)}\b", text), word


def test_readme_test_command_is_the_ci_command():
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    assert len(ci) == 1
    assert ci[0] in [ln.strip() for block in code_blocks(README.read_text()) for ln in block.splitlines()]


def test_readme_run_commands_compose():
    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import register_resolvers
    from krea_sweeps.sweeps import check_group_options

    register_resolvers()
    found = run_py_commands(README.read_text())
    assert len(found) >= 4, "the README shows the main job and some sweeps"
    for args in found:
        check_group_options(args)
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            compose("config", first_job_overrides(args), return_hydra_config=True)


def test_readme_tool_commands_parse():
    from krea_sweeps.collect import argument_parser
    from krea_sweeps.export import parse_args

    tools = {"krea-collect": lambda a: argument_parser().parse_args(a),
             "krea-export": parse_args}
    for argv in commands(README.read_text()):
        if argv[0] in tools:
            tools[argv[0]](argv[1:])
        elif argv[:3] == ["python", "-m", "krea_sweeps.collect"]:
            argument_parser().parse_args(argv[3:])
        elif argv[0] == "python" and argv[1].startswith("bench/"):
            assert (REPO / argv[1]).exists(), argv


@pytest.mark.parametrize("doc", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_local_link_resolves(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: {target}"
        if anchor and file.suffix == ".md":
            headings = [_anchor(h) for h in re.findall(r"^#+\s+(.*)$", file.read_text(), flags=re.M)]
            assert anchor in headings, f"{doc.name}: {target} (anchors: {headings})"


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_preset_table_has_every_preset_with_the_jobs_it_runs():
    """Each conf/experiment/<name>.yaml has a row in the README's table, and the row's job count is what the preset's
    sweep axes expand to (composed with Hydra, as `python run.py -m +experiment=NAME` would)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from krea_sweeps.plan import register_resolvers

    register_resolvers()
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (\d+)\b", README.read_text(), flags=re.M))
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert set(presets) <= set(rows), f"add a row to the README's preset table for: {sorted(set(presets) - set(rows))}"
    parser = OverridesParser.create()
    for name in presets:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", [f"+experiment={name}"], return_hydra_config=True)
        axes = parser.parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
        jobs = 1
        for axis in axes:
            jobs *= len(list(axis.sweep_string_iterator())) if axis.is_sweep_override() else 1
        assert int(rows[name]) == jobs, f"README says {name} runs {rows[name]} jobs; its sweep axes give {jobs}"
