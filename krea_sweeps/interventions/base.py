"""The intervention protocol: an intervention is (site, op, gates) — validate early, `fit` what it learns from
reference prompts before the run, attach as a context manager (the generic `hooks.attach`), describe for logs and W&B.

`describe()` is the configuration only, so it is the same before and after a run; what `fit` learned is recorded
separately (`fitted()`, numbers only, and `report()` for the job's summary)."""

from __future__ import annotations

import re
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from ..configs import InterventionFields, check_instance
from ..errors import ConfigError, require
from ..sampler import Denoising, DenoiseState
from .hooks import HookRegistry, Op, attach, check_accepts


@dataclass
class InterventionContext:
    """What an intervention may need besides the text path: encoding reference prompts (ablate mean, steer pairs),
    and — filled by `plan()` from config alone, so bad input fails before any load — the sampler's step count (to
    check `steps` windows), its resolved guidance (0 = no negative branch for `apply_to`) and the encoder width D of
    the taps [.., 12, D] (to check a steer direction file). None = unknown: that check is skipped."""

    text_path: Any = None
    encode: Callable[[list[str]], Any] | None = None
    num_steps: int | None = None
    # The pipeline calls the attached hooks follow: pass the same object to `generate(..., denoising=ctx.denoising)`,
    # which gives each pipeline call its own DenoiseState; `state` is the call the transformer runs for now (cond /
    # step 0 when the text path runs on its own, as conditioning-only runs should).
    denoising: Denoising = field(default_factory=Denoising)
    guidance: float | None = None
    text_dim: int | None = None
    dit_dim: int | None = None  # the DiT's hidden size: the width of its text tokens (site dit_text)
    # The projector's edit chain per module (the job's session's): edits attached through this context compose.
    projector_chains: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    # The prompts whose states may enter text_fusion while attached (the job's prompts and negative prompt) and a way
    # to encode other encoder layers of them: what the lens and patch interventions look their rows up in.
    prompts: list[str] | None = None
    encode_layers: Callable[[list[str], tuple[int, ...]], Any] | None = None
    # The named hooks attached through this context (the job's session's: `Session.attached()` lists them).
    hooks: HookRegistry = field(default_factory=HookRegistry)
    # The DiT, for the sites inside it (`dit_attention`): given, or fetched on first use by `get_transformer` (a job
    # that generates images passes its model's, so attaching elsewhere loads nothing); with neither, such a site is
    # refused when attached, naming `intervention.site`.
    transformer: Any = None
    get_transformer: Callable[[], Any] | None = None

    @property
    def state(self) -> DenoiseState:
        """The generation state gates read: the pipeline call the transformer is running for right now."""
        return self.denoising.current


@dataclass
class Intervention(InterventionFields):
    """Base: (site, op, gates). The gates are CFG branch (`apply_to`) and denoising-step window (`steps` =
    [start, end)), declared with every intervention's fields in `configs.py`; a subclass says where it acts (`placement`: a site of `sites.SITES`, and the layerwise blocks for
    per-block sites) and what it does there (`make_op`: an `Op` built from its fields), and, when it learns from
    reference prompts, `learn(ctx)`. Subclasses that need more than one hook may still override `attach`."""

    kind: ClassVar[str] = "base"
    # The config key this object came from (`intervention`, or `interventions[i]` for list entries): errors are
    # raised as `intervention.X` and rewritten to it by `keyed()`. Set per instance by plan.effective_interventions.
    config_key: ClassVar[str] = "intervention"

    def __post_init__(self):
        check_instance(self, "intervention")  # types and choices, as composition checks them (configs.py)
        if self.steps is not None:
            require(len(self.steps) == 2 and 0 <= self.steps[0] < self.steps[1], "intervention.steps",
                    f"{self.steps} is not a window [start, end)", "give [start, end) with 0 <= start < end")

    # ---- (site, op)
    def make_op(self) -> Op | None:
        """The op this intervention installs, built from its fields (None: it installs nothing generic)."""
        return None

    @property
    def op(self) -> Op | None:
        if "_op" not in self.__dict__:
            self.__dict__["_op"] = self.make_op()
        return self.__dict__["_op"]

    @property
    def placement(self) -> tuple[str, list[int] | None]:
        """(site, layerwise blocks or None): by default the `site` field."""
        return getattr(self, "site", None), None

    def check_site(self) -> None:
        """The site accepts the op — one line naming `intervention.site` otherwise (at construction/plan time)."""
        op = self.make_op()  # fresh: fields may not be normalised yet when a subclass checks early
        if op is not None:
            check_accepts(self.placement[0], op, "intervention.site")

    @property
    def depends_on_step(self) -> bool:
        """Declared, never inferred: the output varies with the denoising step (a step window, or an op that
        declares it reads the step). A subclass whose edit changes per call in another way must return True too,
        or the text-path cache (`sampler.fast`) reuses its first step's output for the whole image."""
        return self.steps is not None or bool(getattr(self.op, "depends_on_step", False))

    # ---- fit
    def learn(self, ctx: InterventionContext) -> dict:
        """Compute what the op needs from reference prompts (through the text path as attached so far) and give the
        record of it (numbers only). Called once, by `fit`."""
        return {}

    def fit(self, ctx: InterventionContext) -> dict:
        """The explicit fit step (idempotent): `learn` once, keep its record (`fitted()`)."""
        if "_fitted" not in self.__dict__:
            self.__dict__["_fitted"] = dict(self.learn(ctx) or {})
        return self.__dict__["_fitted"]

    def fitted(self) -> dict | None:
        """What `fit` learned (None before it ran)."""
        return self.__dict__.get("_fitted")

    def validate(self, ctx: InterventionContext) -> None:
        """Checks that need the run's context (sampler steps); called before any model load."""
        self.check_site()
        if self.steps is not None and ctx.num_steps is not None:
            require(self.steps[1] <= ctx.num_steps, "intervention.steps",
                    f"window {self.steps} exceeds the sampler's {ctx.num_steps} steps",
                    f"keep end <= {ctx.num_steps} (or raise sampler.steps)")
        if ctx.guidance is not None and ctx.guidance <= 0 and not self.is_identity:
            # Without CFG the transformer never runs a negative branch, so an uncond-only edit would silently be a
            # no-op that still gets recorded as an intervention.
            require(self.apply_to != "uncond", "intervention.apply_to",
                    f"apply_to=uncond edits only the negative CFG branch, but guidance is {ctx.guidance:g} (no "
                    "negative branch runs)", "use apply_to=cond (or both), or a variant/sampler with guidance > 0 "
                    "(e.g. model=raw, or sampler.guidance=4.5)")

    def active(self, state: DenoiseState) -> bool:
        """Whether the edit applies to the text_fusion call happening now."""
        if self.apply_to != "both" and state.branch != self.apply_to:
            return False
        if self.steps is not None and not (self.steps[0] <= state.step < self.steps[1]):
            return False
        return True

    @property
    def is_identity(self) -> bool:
        return False

    @contextmanager
    def attach(self, ctx: InterventionContext) -> Iterator[None]:
        """Install the op at its site (fitted first if it was not): nothing at all for an identity setting."""
        if self.op is None or self.is_identity:
            yield
            return
        self.fit(ctx)
        site, blocks = self.placement
        with attach(site, self.op, self, ctx, at=blocks, key=self.config_key):
            yield

    def describe(self) -> dict:
        """The configuration (never what `fit` learned): the same before and after a run."""
        out = {"kind": self.kind}
        out.update({k: v for k, v in asdict(self).items()})
        return out

    def report(self) -> dict:
        """Numbers `fit` learned that belong in the job's summary (e.g. steer's pair consistency)."""
        return {}


@dataclass
class NoIntervention(Intervention):
    kind: ClassVar[str] = "none"

    @property
    def is_identity(self) -> bool:
        return True


def rekeyed(error: ConfigError, key: str) -> ConfigError:
    """`error` with `intervention[.X]` rewritten to `key[.X]` (in its key and in the text), so an entry of the
    `interventions` list is named by its real key `interventions[i].X`."""
    if key == "intervention" or not re.match(r"intervention(\.|$)", error.key):
        return error
    def sub(text: str) -> str:
        return re.sub(r"(?<![\w.])intervention(?=\.\w)", key, text)
    return ConfigError(key + error.key[len("intervention"):], sub(error.problem), sub(error.fix))


@contextmanager
def keyed(key: str) -> Iterator[None]:
    """Re-raise any ConfigError of the body under `key` (see `rekeyed`)."""
    try:
        yield
    except ConfigError as e:
        raise rekeyed(e, key) from None


def validate_all(interventions: list[Intervention], ctx: InterventionContext) -> None:
    """`validate` each intervention, its errors named by the config key it came from."""
    for intervention in interventions:
        with keyed(intervention.config_key):
            intervention.validate(ctx)


def fit_all(interventions: list[Intervention], ctx: InterventionContext) -> list[dict]:
    """The fit step: each intervention learns with the ones before it attached (so a reference is computed in the
    space its edit is applied in, as composed), then everything is detached. Returns the fitted records."""
    with ExitStack() as stack:
        for i, intervention in enumerate(interventions):
            with keyed(intervention.config_key):
                intervention.fit(ctx)
                if any(later.fitted() is None for later in interventions[i + 1:]):
                    stack.enter_context(intervention.attach(ctx))
    return [i.fitted() for i in interventions]


@contextmanager
def applied(interventions: list[Intervention], ctx: InterventionContext) -> Iterator[None]:
    """Attach every intervention in order (fitting any not yet fitted); detach in reverse order, whatever happens."""
    fit_all(interventions, ctx)
    with ExitStack() as stack:
        for intervention in interventions:
            with keyed(intervention.config_key):
                stack.enter_context(ctx.denoising.declaring(intervention.depends_on_step, intervention.apply_to))
                stack.enter_context(intervention.attach(ctx))
        yield


def describe_all(interventions: list[Intervention]) -> list[dict]:
    return [i.describe() for i in interventions]
