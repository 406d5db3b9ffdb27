"""One error type for bad input: it names the config key and the fix, in one line, before any model work."""

import math
import numbers


class ConfigError(ValueError):
    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"config key `{key}`: {problem} — {fix}")


def require(condition: bool, key: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(key, problem, fix)


def did_you_mean(word, choices) -> str:
    """`did you mean 'x'? ` for the closest of `choices` to a misspelt `word`, or '' when none is close."""
    from difflib import get_close_matches

    close = get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def require_choice(value, options, key: str, what: str = "value") -> None:
    """`value` one of `options`, or one line naming the key, the closest option and all of them."""
    options = list(options)
    require(value in options, key, f"unknown {what} {value!r}",
            f"{did_you_mean(value, options)}use one of: {', '.join(str(o) for o in options)}")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def require_finite(values, key: str) -> None:
    """Every value a finite number. Hydra hands over command-line text it cannot parse (`=abc`) as a string, and
    `true` as a bool: both are rejected here rather than passed on to fail later (or not at all)."""
    for v in values if isinstance(values, (list, tuple)) else [values]:
        if not _is_number(v):
            raise ConfigError(key, f"{v!r} is not a number", f"give a number, e.g. {key}=1.0")
        if not math.isfinite(v):
            raise ConfigError(key, f"{v} is not a finite number", "give finite values (no NaN or inf)")
