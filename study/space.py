"""Search-space files: small Python modules, loaded by path, validated before Ray starts.

A space file declares (all optional but SPACE):

    NAME = "lora"                  # study name = MLflow experiment (default: the file's stem)
    FIXED = {"method": "lora"}     # TrialConfig values shared by every trial
    SPACE = {"lr": loguniform(1e-4, 3e-3), "lora_rank": choice([8, 16, 64]), ...}
    SMOKE = {"stage2_steps": 20}   # overrides for --smoke (the smallest budget that runs everything)
    NUM_SAMPLES, MAX_CONCURRENT, METRIC = "score", MODE = "max", SEED
    SAMPLER = "tpe"                # or "grid" (every combination of choice() values, e.g. Table 3), "random",
                                   # "nsga2" (several objectives)
    OBJECTIVES = {"score": "max", "gpu_hours": "min"}   # several objectives instead of METRIC/MODE
    SCHEDULER = asha(grace_steps=60)    # early stopping on interim evaluations (needs interim_every)
    BUDGET_GPU_HOURS = 2.0, BUDGET_DOLLARS = 30.0       # stop launching trials when spent (--budget-* win)
    SEED_POINTS = [{"lora_rank": 16, "lora_alpha": 32, "lr": 2e-4}]   # tried first (the paper's settings)
    SEEDS = 3                      # each configuration trained at 3 seeds (data order, LoRA init, dropout):
                                   # NUM_SAMPLES configurations x SEEDS trials; the search learns from the mean
    DEVICE = "A100", MFU = 0.35    # the forecast's device and utilisation (default: measured on this machine)

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

from trainables.config import MAX_SEED, ConfigError, TrialConfig, trial_config

STUDY_NAMES = {"NAME", "FIXED", "SPACE", "SMOKE", "NUM_SAMPLES", "MAX_CONCURRENT", "METRIC", "MODE", "SEED",
               "SEEDS", "SAMPLER", "OBJECTIVES", "SCHEDULER", "BUDGET_GPU_HOURS", "BUDGET_DOLLARS", "SEED_POINTS", "DEVICE",
               "MFU"}
SAMPLERS = ("tpe", "grid", "random", "nsga2")
# The settings that decide how a trial's data is encoded: its tokenizer, its image tokens, its length budget.
ENCODING_KEYS = ("model_size", "vision_tower", "image_size", "method", "max_length", "neck_every")


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


@dataclass(frozen=True)
class ASHA:
    """Asynchronous successive halving (Li et al. 2020) on the trials' interim evaluations: at stage-2 steps
    grace_steps x reduction_factor^k, a trial not in the best 1/reduction_factor of those that reached the
    step is stopped (Ray Tune's ASHAScheduler, time attribute our own `stage2_step`)."""
    grace_steps: int            # stage-2 steps every trial runs before it can be stopped
    reduction_factor: float = 3
    brackets: int = 1

    def scheduler(self, max_steps: int, interim_every: int, smoke: bool = False):
        """Ray Tune's ASHAScheduler for trials of `max_steps` stage-2 steps. Under --smoke (a few steps) the
        grace period is one interim evaluation, so a smoke run still stops trials."""
        from ray.tune.schedulers import ASHAScheduler

        grace = min(interim_every, max_steps) if smoke else self.grace_steps
        return ASHAScheduler(time_attr="stage2_step", metric="interim_score", mode="max", max_t=max_steps,
                             grace_period=grace, reduction_factor=self.reduction_factor, brackets=self.brackets)


def asha(grace_steps: int, reduction_factor: float = 3, brackets: int = 1) -> ASHA:
    """`SCHEDULER = asha(grace_steps=60)`: stop trials early on `interim_score` (TrialConfig.interim_every)."""
    return ASHA(grace_steps, reduction_factor, brackets)


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
    objectives: dict | None = None      # {metric: "max" | "min"}; None: METRIC and MODE alone
    scheduler: ASHA | None = None
    budget_gpu_hours: float | None = None
    budget_dollars: float | None = None
    seed_points: list = field(default_factory=list)
    seeds: int = 1                      # trials per configuration, at seeds seed, seed + 1, ... (study.search)
    device: str | None = None
    mfu: float | None = None

    def goals(self) -> dict[str, str]:
        """What the search optimises: OBJECTIVES, or {METRIC: MODE}."""
        return dict(self.objectives) if self.objectives else {self.metric: self.mode}

    def optuna_sampler(self):
        """TPE by default (multi-objective TPE with several objectives); NSGA-II; a grid walks every combination
        of the choice() values (a factorial study); random."""
        import optuna

        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.grid(), seed=self.seed)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        if self.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=4)

    def seed_params(self) -> list[dict]:
        """SEED_POINTS as Optuna's parameters (alpha given as lora_alpha becomes alpha_per_rank)."""
        out = []
        for point in self.seed_points:
            params = {}
            for key, spec in self.space.items():
                if isinstance(spec, AlphaPerRank):
                    params["alpha_per_rank"] = point[key] / point["lora_rank"]
                else:
                    params[key] = point[key]
            out.append(params)
        return out

    def grid(self) -> dict[str, list]:
        """Optuna's parameters and their values for a grid (alpha_per_rank's multipliers under its own name)."""
        return {("alpha_per_rank" if isinstance(v, AlphaPerRank) else k):
                list((v.multiplier if isinstance(v, AlphaPerRank) else v).values) for k, v in self.space.items()}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def constants(self, smoke: bool = False) -> dict:
        return {**self.fixed, **(self.smoke if smoke else {})}

    def define_by_run(self, constants: dict) -> "DefineByRun":
        """The Optuna define-by-run function over SPACE (conditional keys such as alpha_per_rank need one);
        `constants` are what every trial gets besides (the study plan's: FIXED, SMOKE, the data's decisions)."""
        return DefineByRun(self.space, dict(constants))

    def sample(self, seed: int = 0, smoke: bool = False) -> TrialConfig:
        """One trial config drawn with Optuna's random sampler (for tests and --dry-run)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        trial = study.ask()
        constants = self.define_by_run(self.constants(smoke))(trial)
        return trial_config({**constants, **trial.params})

    def values_of(self, key: str, smoke: bool = False) -> list:
        """The values trials can have for `key`: a choice()'s, a range's ends, or the one constant."""
        if key in self.space:
            return list(self.space[key].corners())
        return [self.constants(smoke).get(key, TrialConfig.__dataclass_fields__[key].default)]

    def encoding_configs(self, smoke: bool = False) -> list[TrialConfig]:
        """A trial config for every combination of the settings that decide how data is encoded (the
        tokenizer, the tower and its image tokens, the method's, max_length), the rest as in `sample`:
        what the dataset check must cover (trainables.prepare)."""
        import itertools

        base = self.sample(self.seed, smoke).to_dict()
        keys = [k for k in ENCODING_KEYS if k in self.space or k in self.constants(smoke)]
        out = []
        for combo in itertools.product(*(self.values_of(k, smoke) for k in keys)):
            try:
                out.append(TrialConfig.from_dict({**base, **dict(zip(keys, combo))}))
            except ConfigError:
                continue  # a combination no trial has (validate() names the bad values of the space)
        return out or [TrialConfig.from_dict(base)]


def load(path: str | Path) -> Space:
    """Load and validate a space file; raises SpaceError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: no such search-space file")
    try:
        ns = runpy.run_path(str(path))
    except SyntaxError as e:
        raise SpaceError(f"{path}:{e.lineno}: does not parse: {e.msg}") from None
    except SystemExit as e:  # sys.exit() in a space file would end the study command with its code, silently
        raise SpaceError(f"{path}: calls sys.exit({e.code!r}) while loading (a space file declares values, "
                         "it runs nothing)") from None
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
                  sampler=ns.get("SAMPLER", "tpe"), objectives=ns.get("OBJECTIVES"), scheduler=ns.get("SCHEDULER"),
                  budget_gpu_hours=ns.get("BUDGET_GPU_HOURS"), budget_dollars=ns.get("BUDGET_DOLLARS"),
                  seed_points=ns.get("SEED_POINTS", []), seeds=ns.get("SEEDS", 1), device=ns.get("DEVICE"),
                  mfu=ns.get("MFU"))
    validate(space)
    return space


# Settings of the command, not of the space: a space file that set them would override what the command
# checked (the --data dataset) or where the study keeps its state (--storage).
COMMAND_SETTINGS = {"data": "--data DIR", "storage": "--storage DIR", "stage1_data": "--stage1-data DIR",
                    "tracking_uri": "--tracking-uri URI"}
ALL_VALUES_UP_TO = 1000   # an integer range with at most this many values is checked value by value
COMBINATIONS_UP_TO = 20_000  # the product of every key's values is checked when it is at most this large


def validate(space: Space) -> None:
    from tracking import metrics

    path = space.path
    if space.mode not in ("max", "min"):
        raise SpaceError(f"{path}: MODE={space.mode!r} should be 'max' or 'min'")
    if not isinstance(space.metric, str) or space.metric not in metrics.finals():
        raise SpaceError(f"{path}: METRIC={space.metric!r} is not a metric a trial reports at its end "
                         f"(one of: {', '.join(metrics.finals())})")
    better = metrics.METRICS[space.metric].direction
    if better and better != space.mode:
        raise SpaceError(f"{path}: MODE={space.mode!r} with METRIC={space.metric!r}, where "
                         f"{'higher' if better == 'max' else 'lower'} is better: MODE={better!r}")
    _validate_search(space)
    if space.sampler not in SAMPLERS:
        raise SpaceError(f"{path}: SAMPLER={space.sampler!r} should be one of {', '.join(SAMPLERS)}")
    if space.sampler == "grid":
        odd = [k for k, v in space.space.items() if not isinstance(v, Choice) and not (
            isinstance(v, AlphaPerRank) and isinstance(v.multiplier, Choice))]
        if odd:
            raise SpaceError(f"{path}: SPACE[{odd[0]!r}]: SAMPLER='grid' needs choice() values for every key")
    for name, value, low in (("NUM_SAMPLES", space.num_samples, 1), ("MAX_CONCURRENT", space.max_concurrent, 1),
                             ("SEED", space.seed, 0)):
        if value is None and name == "MAX_CONCURRENT":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpaceError(f"{path}: {name}={value!r} should be an integer of at least {low}")
    for section in ("fixed", "space", "smoke"):
        for key in getattr(space, section):
            if key in COMMAND_SETTINGS:
                raise SpaceError(f"{path}: {section.upper()}[{key!r}]: {key} is a setting of the command "
                                 f"({COMMAND_SETTINGS[key]}), not of a space file")
            if key not in TrialConfig.__dataclass_fields__:
                raise SpaceError(f"{path}: {section.upper()}: unknown key {key!r}")
    for key, spec in space.space.items():
        where = f"{path}: SPACE[{key!r}]"
        if not hasattr(spec, "suggest"):
            raise SpaceError(f"{where} = {spec!r} is not a distribution "
                             "(use choice / uniform / loguniform / randint / alpha_per_rank)")
        if isinstance(spec, Choice) and not spec.values:
            raise SpaceError(f"{where}: choice() needs at least one value")
        if isinstance(spec, AlphaPerRank) and isinstance(spec.multiplier, Choice) and not spec.multiplier.values:
            raise SpaceError(f"{where}: alpha_per_rank() needs at least one multiplier")
        if isinstance(spec, (Float, Int)) and not spec.low <= spec.high:
            raise SpaceError(f"{where}: low {spec.low} > high {spec.high}")
        if isinstance(spec, Float) and not (math.isfinite(spec.low) and math.isfinite(spec.high)):
            raise SpaceError(f"{where}: the range [{spec.low}, {spec.high}] is not finite")
        if isinstance(spec, Float) and spec.log and spec.low <= 0:
            raise SpaceError(f"{where}: a log range needs low > 0, got {spec.low}")
        if isinstance(spec, Float) and type(TrialConfig.__dataclass_fields__[key].default) is int:
            raise SpaceError(f"{where}: {key} is an integer, and uniform()/loguniform() sample fractions "
                             f"(e.g. {(spec.low + spec.high) / 2:g}): use randint() or choice()")
        if isinstance(spec, AlphaPerRank) and "lora_rank" not in space.space and "lora_rank" not in space.fixed:
            raise SpaceError(f"{where}: alpha_per_rank needs lora_rank")
    # Every value the sampler can produce, with and without the smoke overrides, must be a valid TrialConfig:
    # each key's values alone (the message names the key), then their combinations (keys that meet in
    # TrialConfig's checks, e.g. method and zero_stage, or batch_size and num_workers).
    for smoke in (False, True):
        base = space.constants(smoke)
        _check(path, "FIXED/SMOKE", base)
        ranks = _all_values(space.space.get("lora_rank")) or [base.get("lora_rank", TrialConfig.lora_rank)]
        for key, spec in space.space.items():
            for value in _all_values(spec):
                if isinstance(spec, AlphaPerRank):
                    for r in ranks:
                        _check(path, f"SPACE[{key!r}]", {**base, "lora_rank": r, key: r * value}, key)
                else:
                    _check(path, f"SPACE[{key!r}]", {**base, key: value}, key)
        _check_combinations(space, base)


def _validate_search(space: Space) -> None:
    """OBJECTIVES, SCHEDULER, the budgets, SEED_POINTS, DEVICE and MFU (study.search, study.forecast)."""
    from study.forecast import PEAK_FLOPS
    from tracking import metrics

    path = space.path
    if space.objectives is not None:
        if not isinstance(space.objectives, dict) or len(space.objectives) < 1:
            raise SpaceError(f"{path}: OBJECTIVES={space.objectives!r} should be a dict of metric -> 'max' or 'min'")
        for name, mode in space.objectives.items():
            if name not in metrics.finals():
                raise SpaceError(f"{path}: OBJECTIVES[{name!r}]: not a metric a trial reports at its end "
                                 f"(one of: {', '.join(metrics.finals())})")
            if mode not in ("max", "min"):
                raise SpaceError(f"{path}: OBJECTIVES[{name!r}]={mode!r} should be 'max' or 'min'")
            better = metrics.METRICS[name].direction
            if better and better != mode:
                raise SpaceError(f"{path}: OBJECTIVES[{name!r}]={mode!r}, but {'higher' if better == 'max' else 'lower'}"
                                 f" {name} is better: {better!r}")
    if isinstance(space.seeds, bool) or not isinstance(space.seeds, int) or not 1 <= space.seeds <= 100:
        raise SpaceError(f"{path}: SEEDS={space.seeds!r} should be a whole number of seeds per configuration, 1 to 100")
    if space.seeds > 1 and "seed" in space.space:
        raise SpaceError(f"{path}: SEEDS={space.seeds} and SPACE['seed'] both vary the seed: keep one (SEEDS runs "
                         "every configuration at each seed and the search learns from their mean)")
    for smoke in (False, True):  # a configuration's seeds are seed, seed + 1, ..., seed + SEEDS - 1
        first = space.constants(smoke).get("seed", 0)
        last = first + space.seeds - 1 if isinstance(first, int) and not isinstance(first, bool) else None
        if last is not None and space.seeds > 1 and last > MAX_SEED:
            raise SpaceError(f"{path}: SEEDS={space.seeds} from seed={first} reaches seed={last}, past the largest "
                             f"seed {MAX_SEED} (2**32 - 1)")
    if space.sampler == "nsga2" and len(space.goals()) < 2:
        raise SpaceError(f"{path}: SAMPLER='nsga2' is for several OBJECTIVES; with one metric use 'tpe'")
    if space.scheduler is not None:
        if not isinstance(space.scheduler, ASHA):
            raise SpaceError(f"{path}: SCHEDULER={space.scheduler!r} should be asha(grace_steps=...) from study.space")
        if not (isinstance(space.scheduler.grace_steps, int) and space.scheduler.grace_steps >= 1
                and space.scheduler.reduction_factor > 1 and space.scheduler.brackets >= 1):
            raise SpaceError(f"{path}: SCHEDULER={space.scheduler}: grace_steps >= 1, reduction_factor > 1, "
                             "brackets >= 1")
        for smoke in (False, True):
            every = space.constants(smoke).get("interim_every", 0) if "interim_every" not in space.space else None
            if not every:
                raise SpaceError(f"{path}: SCHEDULER needs interim evaluations: set interim_every (stage-2 steps "
                                 f"between them) in FIXED{' or SMOKE' if smoke else ''}")
        steps = space.values_of("stage2_steps")
        if space.scheduler.grace_steps >= min(steps):
            raise SpaceError(f"{path}: SCHEDULER's grace_steps={space.scheduler.grace_steps} should be fewer than "
                             f"the stage-2 steps ({min(steps)}): no trial could be stopped")
    for name in ("budget_gpu_hours", "budget_dollars"):
        value = getattr(space, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise SpaceError(f"{path}: {name.upper()}={value!r} should be a positive number")
    if space.device is not None and space.device not in PEAK_FLOPS:
        raise SpaceError(f"{path}: DEVICE={space.device!r} is not in the table of devices "
                         f"({', '.join(PEAK_FLOPS)}); leave it out to measure this machine")
    if space.mfu is not None and (isinstance(space.mfu, bool) or not isinstance(space.mfu, (int, float))
                                  or not 0 < space.mfu <= 1):
        raise SpaceError(f"{path}: MFU={space.mfu!r} should be a share of the device's peak, in (0, 1]")
    if (space.device is None) != (space.mfu is None):
        raise SpaceError(f"{path}: DEVICE and MFU go together (the forecast's rate is the device's peak x MFU); "
                         "leave both out to measure this machine")
    if not isinstance(space.seed_points, list):
        raise SpaceError(f"{path}: SEED_POINTS should be a list of dicts of SPACE keys")
    for n, point in enumerate(space.seed_points):
        where = f"{path}: SEED_POINTS[{n}]"
        if not isinstance(point, dict) or set(point) != set(space.space):
            keys = sorted(point) if isinstance(point, dict) else point
            raise SpaceError(f"{where}: {keys!r} should give exactly the SPACE keys {sorted(space.space)}")
        for key, spec in space.space.items():
            value = point[key]
            if isinstance(spec, AlphaPerRank):
                value = value / point["lora_rank"]
                spec = spec.multiplier
            if isinstance(spec, Choice) and value not in spec.values:
                ratio = f" (alpha_per_rank {value:g} = {point[key]!r} / lora_rank {point['lora_rank']!r})" \
                    if isinstance(space.space[key], AlphaPerRank) else ""
                raise SpaceError(f"{where}[{key!r}]={point[key]!r}{ratio} is not one of the choice() values "
                                 f"{spec.values}")
            if isinstance(spec, (Float, Int)) and not spec.low <= value <= spec.high:
                raise SpaceError(f"{where}[{key!r}]={point[key]!r} is outside [{spec.low}, {spec.high}]")
        _check(path, f"SEED_POINTS[{n}]", {**space.constants(), **point})


def _all_values(spec) -> list:
    """What the sampler can produce for a key: every choice, every integer of a small range, a float range's ends."""
    if spec is None:
        return []
    if isinstance(spec, Int) and spec.high - spec.low < ALL_VALUES_UP_TO:
        return list(range(spec.low, spec.high + 1))
    if isinstance(spec, AlphaPerRank):
        return _all_values(spec.multiplier)
    return spec.corners()


def _check_combinations(space: Space, base: dict) -> None:
    import itertools

    keys = [k for k in space.space if not isinstance(space.space[k], AlphaPerRank)]
    values = [_all_values(space.space[k]) for k in keys]
    if math.prod(len(v) for v in values) > COMBINATIONS_UP_TO:
        return  # each key alone was checked; a product this large is a random search, not a grid
    for combo in itertools.product(*values):
        chosen = dict(zip(keys, combo))
        try:
            TrialConfig.from_dict({**base, **chosen})
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
            raise SpaceError(f"{space.path}: SPACE: {e} (the sampler can produce {shown})") from None


def _corners(spec) -> list:
    return spec.corners() if spec is not None else []


def _check(path: Path, where: str, values: dict, key: str | None = None) -> None:
    try:
        TrialConfig.from_dict({k: v for k, v in values.items()})
    except ConfigError as e:
        raise SpaceError(f"{path}: {where}: {e}") from None
    if key and isinstance(values.get(key), float) and not math.isfinite(values[key]):
        raise SpaceError(f"{path}: {where}: {key} is not finite")
