"""Build objects from config nodes: only our classes (or a user's subclass of them), and one line for any error.

Below `plan` and `report`, which both build what a config names (a job's parts, a preset's report panels).
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

from .errors import ConfigError, did_you_mean, require

# The class every `_target_` of a config group must be (a subclass of): anything else — `shutil.copy`, `open`,
# `Path.write_text` — is refused before it is called. A user's own subclass in their own module is fine.
BASE_CLASSES = {
    "model": "krea_sweeps.models.ModelVariant",
    "sampler": "krea_sweeps.sampler.Sampler",
    "prompts": "krea_sweeps.prompts.PromptSet",
    "intervention": "krea_sweeps.interventions.base.Intervention",
    "interventions": "krea_sweeps.interventions.base.Intervention",
    "metrics": "krea_sweeps.metrics.base.Metric",
    "wandb": "krea_sweeps.tracking.WandbConfig",
}


def check_targets(node: Any, key: str) -> None:
    """Every `_target_` in `node` (nested ones too: Hydra instantiates recursively) must name a subclass of the
    group's base class; checked by importing the named class, never by calling anything."""
    from hydra.utils import get_object

    group = re.split(r"[.\[]", key, maxsplit=1)[0]
    base = get_object(BASE_CLASSES[group]) if group in BASE_CLASSES else None
    for where, target in _targets(node, key):
        try:
            found = get_object(target) if isinstance(target, str) else None
        except Exception:
            found = None
        ours = isinstance(found, type) and found.__module__.startswith("krea_sweeps.")
        if where != key and ours:  # a nested part of one of our objects (e.g. model.synthetic_weights)
            continue
        if base is None:  # a group without a base class (e.g. report panels): only classes of this package
            require(isinstance(found, type) and found.__module__.startswith("krea_sweeps."), f"{where}._target_",
                    f"{target!r} is not a krea_sweeps class", f"use one of the `{group}` classes of krea_sweeps")
            continue
        require(isinstance(found, type) and issubclass(found, base), f"{where}._target_",
                f"{target!r} is not a subclass of {base.__module__}.{base.__name__}",
                f"use one of the `{group}` presets, or your own subclass of {base.__name__} in an importable module "
                "(docs/cluster.md, 'Whose code runs')")


def _targets(node: Any, key: str):
    """(config key, `_target_` value) for every mapping in `node` that has one."""
    if OmegaConf.is_config(node):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except Exception:  # a broken interpolation is instantiate's error to report
            node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield key, v
            else:
                yield from _targets(v, f"{key}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def instantiate(node: Any, key: str):
    """`hydra.utils.instantiate` that surfaces our one-line ConfigError instead of Hydra's wrapped traceback, and
    refuses any `_target_` that is not one of our classes (or a user's subclass of them) before calling it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    check_targets(node, key)
    check_fields(node, key)
    try:
        return hydra_instantiate(node, _convert_="all")
    except (InstantiationException, TypeError) as e:
        cause = innermost_cause(e)
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(key, f"{type(cause).__name__}: {cause}",
                          f"check the `{key}` config (HYDRA_FULL_ERROR=1 shows the traceback)") from None


def check_fields(node: Any, key: str) -> None:
    """Each mapping with a `_target_` in `node` gives only fields its class takes, and every field it requires: read
    from the class's signature (composition already refused a misspelt key of a typed node; this covers what it did
    not see: a key added with `+`, an `interventions` entry, a user's own class), so a misspelt field is one line with
    "did you mean" instead of a constructor error."""
    for where, fields in _fields_by_target(node, key):
        params = parameters_of(fields)
        if params is None:  # no readable signature: the constructor reports it
            continue
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        given = [k for k in fields if not str(k).startswith("_")]
        for name in given:
            require(takes_any or name in params, f"{where}.{name}", f"`{fields['_target_']}` has no field {name!r}",
                    f"{did_you_mean(name, list(params))}its fields: {', '.join(params) or '(none)'}")
        if fields.get("_partial_"):  # the rest is given when the partial is called
            continue
        for name, p in params.items():
            required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            require(not required or name in given, f"{where}.{name}", "is required and not set", f"set {where}.{name}")


def _fields_by_target(node: Any, key: str):
    """(config key, mapping) for every mapping in `node` that has a `_target_`."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for k, v in node.items():
            if k != "_target_":
                yield from _fields_by_target(v, f"{key}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _fields_by_target(v, f"{key}[{i}]")


def parameters_of(node: Any) -> dict | None:
    """The parameters of a config node's `_target_` (what a misspelt field is compared with); None if unreadable."""
    import inspect

    from hydra.utils import get_method

    try:
        return dict(inspect.signature(get_method(str(node.get("_target_")))).parameters)
    except Exception:
        return None


def innermost_cause(error: BaseException) -> BaseException:
    """The error at the bottom of a chain: our ConfigError if one is in it, else the deepest cause. Hydra's
    `InstantiationException` only says which target failed; the reason is below it."""
    seen = []
    while error is not None and error not in seen:
        if isinstance(error, ConfigError):
            return error
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen[-1]
