from dataclasses import FrozenInstanceError

import pytest

from trainables.config import ConfigError, TrialConfig


def test_defaults_are_valid_and_frozen():
    cfg = TrialConfig()
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg  # the defaults pass the checks
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'lr'"):
        cfg.lr = 1.0
    assert cfg.lr == TrialConfig().lr


@pytest.mark.parametrize("values, culprit", [
    ({"lora_rnak": 8}, "lora_rnak"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"lr": -1e-4}, "lr"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"model_size": "7b"}, "model_size"),
    ({"method": "dora"}, "method"),
    ({"zero_stage": 1}, "zero_stage"),
    ({"lora_rank": 8.5}, "lora_rank"),
    ({"use_gpu": "yes"}, "use_gpu"),
    ({"batch_size": 5, "num_workers": 2}, "batch_size"),
])
def test_bad_values_name_their_key(values, culprit):
    with pytest.raises(ConfigError, match=culprit):
        TrialConfig.from_dict(values)


def test_from_dict_coerces_numbers_and_round_trips():
    cfg = TrialConfig.from_dict({"lora_rank": 16.0, "lr": 1, "model_size": "org/some-llm"})
    assert cfg.lora_rank == 16 and isinstance(cfg.lora_rank, int) and cfg.lr == 1.0
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lora_rank=8).lora_rank == 8
