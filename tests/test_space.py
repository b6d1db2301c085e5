"""Every search-space file loads and samples into valid TrialConfigs; bad files are refused by name."""

from pathlib import Path

import pytest

from study import space as spaces
from trainables.config import TrialConfig

SPACE_FILES = sorted((Path(__file__).parent.parent / "search_spaces").glob("[!_]*.py"))


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.name)
def test_space_file_loads_and_samples(path):
    space = spaces.load(path)
    for seed in range(5):
        for smoke in (False, True):
            cfg = space.sample(seed=seed, smoke=smoke)
            assert isinstance(cfg, TrialConfig)
            values = cfg.to_dict()
            for key, dist in space.space.items():
                assert within(dist, values[key], values), (path, key, values[key], dist)
            if not smoke:  # the space file's fixed settings reach the trial as written
                for key, value in space.fixed.items():
                    assert values[key] == value, (path, key)


def within(dist, value, values) -> bool:
    """Whether a sampled trial value lies in its declared distribution (study.space's classes)."""
    from study.space import AlphaPerRank, Choice, Float, Int

    if isinstance(dist, AlphaPerRank):
        return within(dist.multiplier, value / values["lora_rank"], values)
    if isinstance(dist, Choice):
        return value in dist.values
    if isinstance(dist, Int):
        return isinstance(value, int) and dist.low <= value <= dist.high
    if isinstance(dist, Float):
        return dist.low <= value <= dist.high
    raise AssertionError(f"a distribution this test does not know: {dist!r}")


def test_alpha_as_multiple_of_rank(tmp_path):
    f = tmp_path / "s.py"
    f.write_text("from study.space import choice, alpha_per_rank\n"
                 "SPACE = {'lora_rank': choice([8, 64]), 'lora_alpha': alpha_per_rank([2])}\n")
    for seed in range(4):
        cfg = spaces.load(f).sample(seed=seed)
        assert cfg.lora_alpha == 2 * cfg.lora_rank


@pytest.mark.parametrize("body, culprit", [
    ("SPACE = {'lora_rnak': choice([8])}", "lora_rnak"),
    ("SPACE = {'lora_rank': choice([0, 8])}", "lora_rank"),
    ("SPACE = {'lr': loguniform(0, 1e-3)}", "lr"),
    ("SPACE = {'lr': uniform(-1.0, 1e-3)}", "lr"),
    ("SPACE = {'model_size': choice(['1m', '65b'])}", "model_size"),
    ("SPACE = {'lora_alpha': alpha_per_rank([0])}", "lora_alpha"),
    ("SPACE = {}\nFIXED = {'method': 'dora'}", "method"),
    ("SPACE = {}\nNUM_SAMPELS = 3", "NUM_SAMPELS"),
    ("FIXED = {}", "SPACE"),
    ("SPACE = {'lr': 1e-3}", "lr"),
    ("SPACE = {'lr': (", "does not parse"),
    ("SPACE = {'num_workers': choice([1, 3])}\nFIXED = {'batch_size': 32}", "batch_size=32 is out of range"),
    ("SPACE = {'batch_size': choice([8, 9])}\nFIXED = {'num_workers': 2}", "batch_size=9 is out of range"),
    ("SPACE = {'adapter_dim': choice([0, 8])}\nFIXED = {'method': 'mma'}", "adapter_dim"),
    ("SPACE = {}\nFIXED = {'lr': 0}", "lr=0.0 is out of range"),
    ("SPACE = {'lora_alpha': choice([-16])}", "lora_alpha=-16.0 is out of range"),
    ("SPACE = {}\nFIXED = {'model_size': '65b'}", "model_size='65b'"),
    ("SPACE = {}\nFIXED = {'checkpoint_every': -1}", "checkpoint_every=-1"),
    ("SPACE = undefined_name", "fails to load: NameError"),
    # every value the sampler can produce is checked, not only the corners of each range
    ("SPACE = {}\nMETRIC = 'scroe'", "METRIC='scroe' is not a metric a trial reports at its end"),
    ("SPACE = {}\nMETRIC = 'train_loss'", "METRIC='train_loss' is not a metric a trial reports"),
    # logged to MLflow only, never reported to Tune: a search on them would learn nothing
    ("SPACE = {}\nMETRIC = 'time_overhead_s'\nMODE = 'min'", "METRIC='time_overhead_s' is not a metric a trial"),
    ("SPACE = {}\nOBJECTIVES = {'score': 'max', 'forecast_gpu_hours': 'min'}",
     r"OBJECTIVES\['forecast_gpu_hours'\]: not a metric a trial reports at its end"),
    ("SPACE = {}\nMETRIC = 'gpu_hours'", "MODE='max' with METRIC='gpu_hours', where lower is better"),
    ("SPACE = {}\nFIXED = {'data': '/elsewhere'}", r"FIXED\['data'\]: data is a setting of the command \(--data DIR\)"),
    ("SPACE = {}\nSMOKE = {'storage': '/tmp/x'}", r"SMOKE\['storage'\]: storage is a setting of the command"),
    ("SPACE = {'lora_rank': choice([])}", r"SPACE\['lora_rank'\]: choice\(\) needs at least one value"),
    ("SPACE = {'lora_rank': uniform(8, 64)}", "lora_rank is an integer, and uniform.*sample fractions .e.g. 36"),
    ("SPACE = {}\nMAX_CONCURRENT = 1.5", "MAX_CONCURRENT=1.5 should be an integer of at least 1"),
    ("SPACE = {}\nMAX_CONCURRENT = 0", "MAX_CONCURRENT=0 should be an integer"),
    ("SPACE = {}\nSEED = '7'", "SEED='7' should be an integer"),
    ("SPACE = {'lr': choice([1e-3, float('inf')])}", "lr=inf is not a finite number"),
    ("SPACE = {'lr': uniform(1e-4, float('inf'))}", "is not finite"),
    ("SPACE = {'image_size': choice([32, 64])}", "image_size=64 is out of range"),
    ("SPACE = {'batch_size': randint(8, 32)}\nFIXED = {'num_workers': 2}", "batch_size=9 is out of range"),
    ("SPACE = {'batch_size': choice([8, 9]), 'num_workers': choice([1, 2])}",
     r"SPACE: batch_size=9 is out of range.*\(the sampler can produce batch_size=9, num_workers=2\)"),
    ("import sys\nsys.exit(3)", r"calls sys.exit\(3\) while loading"),
    ("SPACE = {}\nFIXED = {'seed': -5}\nSEEDS = 3", "seed=-5 is out of range"),
    ("SPACE = {}\nFIXED = {'seed': 2**32}", r"seed=4294967296 is out of range \(seed of data order, LoRA init and "
                                             r"dropout \(0 to 2\*\*32 - 1\)\)"),
    ("SPACE = {}\nFIXED = {'seed': 2**32 - 2}\nSEEDS = 3",
     r"SEEDS=3 from seed=4294967294 reaches seed=4294967296, past the largest seed 4294967295 \(2\*\*32 - 1\)"),
    ("SPACE = {}\nSEEDS = 0", "SEEDS=0 should be a whole number of seeds per configuration, 1 to 100"),
    ("SPACE = {}\nSEEDS = 2.5", "SEEDS=2.5 should be a whole number"),
    ("SPACE = {}\nSEEDS = True", "SEEDS=True should be a whole number"),
    ("SPACE = {'seed': choice([0, 1])}\nSEEDS = 3", r"SEEDS=3 and SPACE\['seed'\] both vary the seed"),
])
def test_bad_space_files_name_the_key(tmp_path, body, culprit):
    f = tmp_path / "bad.py"
    f.write_text("from study.space import choice, loguniform, uniform, randint, alpha_per_rank\n" + body + "\n")
    with pytest.raises(spaces.SpaceError, match=culprit) as e:
        spaces.load(f)
    assert str(f) in str(e.value)


def test_grid_sampler_walks_every_combination(tmp_path):
    import optuna

    space = spaces.load(Path(__file__).parent.parent / "search_spaces" / "scaling.py")
    assert space.sampler == "grid" and space.grid_size() == space.num_samples == 12
    study = optuna.create_study(sampler=space.optuna_sampler())
    study.optimize(lambda trial: (space.define_by_run(space.constants())(trial), 0.0)[1], n_trials=20)  # the grid stops it
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials) == 12


def test_grid_needs_choices(tmp_path):
    f = tmp_path / "g.py"
    f.write_text("from study.space import loguniform\nSAMPLER = 'grid'\nSPACE = {'lr': loguniform(1e-4, 1e-3)}\n")
    with pytest.raises(spaces.SpaceError, match="SAMPLER='grid' needs choice"):
        spaces.load(f)
