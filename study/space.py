"""Search-space files: small Python modules, loaded by path, validated before Ray starts.

A space file declares (all optional but SPACE):

    NAME = "lora"                  # study name = MLflow experiment (default: the file's stem)
    FIXED = {"method": "lora"}     # TrialConfig values shared by every trial
    SPACE = {"lr": loguniform(1e-4, 3e-3), "lora_rank": choice([8, 16, 64]), ...}
    SMOKE = {"stage2_steps": 20}   # overrides for --smoke (the smallest budget that runs everything)
    NUM_SAMPLES, MAX_CONCURRENT, METRIC = "score", MODE = "max", SEED
    SAMPLER = "tpe"                # or "grid" (every combination of choice() values, e.g. Table 3) or "random"

Keys of FIXED / SPACE / SMOKE are TrialConfig fields, and every value a space can
produce is checked against TrialConfig's ranges here, so a typo or a bad range is an
`error:` line naming the file and key, not a trial that fails an hour later.
Search-space files are Python and run as code: load only files you trust.
"""

from __future__ import annotations

import math
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import ConfigError, TrialConfig, trial_config

STUDY_NAMES = {"NAME", "FIXED", "SPACE", "SMOKE", "NUM_SAMPLES", "MAX_CONCURRENT", "METRIC", "MODE", "SEED",
               "SAMPLER"}
SAMPLERS = ("tpe", "grid", "random")


class SpaceError(ValueError):
    """A bad search-space file; the message names the file and the key."""


# --- the distributions a space file may use (each maps onto one Optuna suggest call) ---

@dataclass(frozen=True)
class Choice:
    values: tuple

    def suggest(self, trial, name, _):
        return trial.suggest_categorical(name, list(self.values))

    def corners(self):
        return list(self.values)


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name, _):
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def corners(self):
        return [self.low, self.high]


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False

    def suggest(self, trial, name, _):
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def corners(self):
        return [self.low, self.high]


@dataclass(frozen=True)
class AlphaPerRank:
    """lora_alpha searched as a multiple of lora_rank (the paper: alpha = 2 x rank is best).

    One name end to end: Optuna's parameter, the logged param and the analysis column are
    `alpha_per_rank`; the trial gets `lora_alpha` = lora_rank x alpha_per_rank.
    """
    multiplier: Any

    def suggest(self, trial, name, chosen):
        return chosen["lora_rank"] * self.multiplier.suggest(trial, "alpha_per_rank", chosen)

    def corners(self):
        return [m for m in self.multiplier.corners()]


def choice(values) -> Choice:
    return Choice(tuple(values))


def uniform(low, high) -> Float:
    return Float(float(low), float(high))


def loguniform(low, high) -> Float:
    return Float(float(low), float(high), log=True)


def randint(low, high) -> Int:
    """Integers in [low, high], both ends included."""
    return Int(int(low), int(high))


def alpha_per_rank(multiplier) -> AlphaPerRank:
    """`SPACE["lora_alpha"] = alpha_per_rank(choice([1, 2, 4]))`: alpha searched as a multiple of the rank."""
    return AlphaPerRank(multiplier if hasattr(multiplier, "suggest") else choice(multiplier))


@dataclass(frozen=True)
class DefineByRun:
    """Picklable (Tune checkpoints the searcher): suggests every SPACE key, returns the constants."""
    space: dict
    constants: dict

    def __call__(self, trial) -> dict:
        chosen = dict(self.constants)
        for key in sorted(self.space, key=lambda k: isinstance(self.space[k], AlphaPerRank)):
            chosen[key] = self.space[key].suggest(trial, key, chosen)
        return {k: v for k, v in self.constants.items() if k not in self.space}


@dataclass
class Space:
    path: Path
    name: str
    fixed: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)
    smoke: dict = field(default_factory=dict)
    num_samples: int = 8
    max_concurrent: int | None = None
    metric: str = "score"
    mode: str = "max"
    seed: int = 0
    sampler: str = "tpe"

    def optuna_sampler(self):
        """TPE by default; a grid walks every combination of the choice() values (a factorial study)."""
        import optuna

        if self.sampler == "grid":
            return optuna.samplers.GridSampler({k: list(v.values) for k, v in self.space.items()}, seed=self.seed)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=4)

    def grid_size(self) -> int:
        return math.prod(len(v.values) for v in self.space.values())

    def constants(self, smoke: bool = False) -> dict:
        return {**self.fixed, **(self.smoke if smoke else {})}

    def define_by_run(self, smoke: bool = False) -> "DefineByRun":
        """The Optuna define-by-run function (conditional keys such as alpha-per-rank need one)."""
        return DefineByRun(self.space, self.constants(smoke))

    def sample(self, seed: int = 0, smoke: bool = False) -> TrialConfig:
        """One trial config drawn with Optuna's random sampler (for tests and --dry-run)."""
        import optuna

        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        trial = study.ask()
        constants = self.define_by_run(smoke)(trial)
        return trial_config({**constants, **trial.params})


def load(path: str | Path) -> Space:
    """Load and validate a space file; raises SpaceError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: no such search-space file")
    try:
        ns = runpy.run_path(str(path))
    except SyntaxError as e:
        raise SpaceError(f"{path}:{e.lineno}: does not parse: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any error in a user's file is reported, not raised
        raise SpaceError(f"{path}: fails to load: {type(e).__name__}: {e}") from None
    unknown = sorted(k for k in ns if k.isupper() and k not in STUDY_NAMES)
    if unknown:
        raise SpaceError(f"{path}: unknown setting {unknown[0]} (known: {', '.join(sorted(STUDY_NAMES))})")
    if "SPACE" not in ns or not isinstance(ns["SPACE"], dict):
        raise SpaceError(f"{path}: SPACE is missing (a dict of TrialConfig keys to distributions)")
    space = Space(path=path, name=str(ns.get("NAME", path.stem)), fixed=dict(ns.get("FIXED", {})),
                  space=dict(ns["SPACE"]), smoke=dict(ns.get("SMOKE", {})),
                  num_samples=ns.get("NUM_SAMPLES", 8), max_concurrent=ns.get("MAX_CONCURRENT"),
                  metric=ns.get("METRIC", "score"), mode=ns.get("MODE", "max"), seed=ns.get("SEED", 0),
                  sampler=ns.get("SAMPLER", "tpe"))
    validate(space)
    return space


def validate(space: Space) -> None:
    path = space.path
    if space.mode not in ("max", "min"):
        raise SpaceError(f"{path}: MODE={space.mode!r} should be 'max' or 'min'")
    if space.sampler not in SAMPLERS:
        raise SpaceError(f"{path}: SAMPLER={space.sampler!r} should be one of {', '.join(SAMPLERS)}")
    if space.sampler == "grid":
        odd = [k for k, v in space.space.items() if not isinstance(v, Choice)]
        if odd:
            raise SpaceError(f"{path}: SPACE[{odd[0]!r}]: SAMPLER='grid' needs choice() values for every key")
    if not isinstance(space.num_samples, int) or space.num_samples < 1:
        raise SpaceError(f"{path}: NUM_SAMPLES={space.num_samples!r} should be a positive integer")
    for section in ("fixed", "space", "smoke"):
        for key in getattr(space, section):
            if key not in TrialConfig.__dataclass_fields__:
                raise SpaceError(f"{path}: {section.upper()}: unknown key {key!r}")
    for key, spec in space.space.items():
        if not hasattr(spec, "suggest"):
            raise SpaceError(f"{path}: SPACE[{key!r}] = {spec!r} is not a distribution "
                             "(use choice / uniform / loguniform / randint / alpha_per_rank)")
        if isinstance(spec, (Float, Int)) and not spec.low <= spec.high:
            raise SpaceError(f"{path}: SPACE[{key!r}]: low {spec.low} > high {spec.high}")
        if isinstance(spec, Float) and spec.log and spec.low <= 0:
            raise SpaceError(f"{path}: SPACE[{key!r}]: a log range needs low > 0, got {spec.low}")
        if isinstance(spec, AlphaPerRank) and "lora_rank" not in space.space and "lora_rank" not in space.fixed:
            raise SpaceError(f"{path}: SPACE[{key!r}]: alpha_per_rank needs lora_rank")
    # Every corner of the space, with and without the smoke overrides, must be a valid TrialConfig.
    for smoke in (False, True):
        base = space.constants(smoke)
        _check(path, "FIXED/SMOKE", base)
        ranks = _corners(space.space.get("lora_rank")) or [base.get("lora_rank", TrialConfig.lora_rank)]
        for key, spec in space.space.items():
            for value in spec.corners():
                if isinstance(spec, AlphaPerRank):
                    for r in ranks:
                        _check(path, f"SPACE[{key!r}]", {**base, "lora_rank": r, key: r * value}, key)
                else:
                    _check(path, f"SPACE[{key!r}]", {**base, key: value}, key)


def _corners(spec) -> list:
    return spec.corners() if spec is not None else []


def _check(path: Path, where: str, values: dict, key: str | None = None) -> None:
    try:
        TrialConfig.from_dict({k: v for k, v in values.items()})
    except ConfigError as e:
        raise SpaceError(f"{path}: {where}: {e}") from None
    if key and isinstance(values.get(key), float) and not math.isfinite(values[key]):
        raise SpaceError(f"{path}: {where}: {key} is not finite")
