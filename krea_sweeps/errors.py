"""One error type for bad input: it names the config key and the fix, in one line, before any model work."""


class ConfigError(ValueError):
    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"config key `{key}`: {problem} — {fix}")


def require(condition: bool, key: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(key, problem, fix)


def require_finite(values, key: str) -> None:
    import math

    for v in values if isinstance(values, (list, tuple)) else [values]:
        if isinstance(v, (int, float)) and not math.isfinite(v):
            raise ConfigError(key, f"{v} is not a finite number", "give finite values (no NaN or inf)")
