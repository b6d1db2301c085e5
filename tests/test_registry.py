"""The method registry is the only place that knows a method: what it logs, how it is labelled and exported.

A fifth method, LoRA on the attention projections only, is added here in one place (this
module) and goes through config, training, logging, export and analysis untouched.
"""

import dataclasses
from functools import partial

import pandas as pd
import pytest
import torch
from support import first_batch
from test_methods import _logged_trial, _save, batch_loss, logits, ATOL

from analysis.plots import trial_label
from analysis.tables import tidy
from study import export
from trainables import worker
from trainables.config import ConfigError, TrialConfig
from trainables.methods import METHODS, apply_stage, lora, register

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_ATTN = dataclasses.replace(lora.METHOD, name="lora_attn", wrap=partial(lora.wrap, targets=ATTENTION),
                                description="LoRA on the attention projections only")


@pytest.fixture(scope="module")
def toy_method():
    register(LORA_ATTN)
    yield LORA_ATTN
    del METHODS["lora_attn"]


def test_params_logged_are_the_ones_that_apply():
    full = TrialConfig(method="full").logged_params()
    assert not {"lora_rank", "lora_alpha", "lora_dropout", "alpha_per_rank", "adapter_dim", "neck_dim"} & set(full)
    assert full["projector_lr"] == 5e-4 and full["stage1_steps"] == 150 and "stage1_lr" in full

    lo = TrialConfig(method="lora", lora_rank=8, lora_alpha=16.0).logged_params()
    assert (lo["lora_rank"], lo["lora_alpha"], lo["alpha_per_rank"]) == (8, 16.0, 2.0)
    assert "adapter_dim" not in lo

    mma = TrialConfig(method="mma", stage1_steps=150).logged_params()
    assert mma["stage1_steps"] == 0 and "stage1_lr" not in mma, "MMA has no stage 1"
    assert mma["adapter_dim"] == 8 and not {"lora_rank", "projector_lr"} & set(mma)


def test_analysis_blanks_leftovers_of_older_runs_by_asking_the_registry():
    old = pd.DataFrame([{"method": "full", "model_size": "1m", "lora_rank": 16, "lora_alpha": 32.0},
                        {"method": "qlora", "model_size": "1m", "lora_rank": 8, "lora_alpha": 16.0}])
    t = tidy(old)
    assert t["lora_rank"].isna().tolist() == [True, False] and t.loc[1, "alpha_per_rank"] == 2.0
    assert [trial_label(r) for _, r in t.iterrows()] == ["full 1m", "qlora 1m r8"]


def test_a_fifth_method_added_in_one_module(toy_method, world_data, process_group, tmp_path):
    cfg = TrialConfig(method="lora_attn", model_size="0.3m", stage1_steps=4, batch_size=8, lr=1e-2, lora_rank=4,
                      lora_alpha=8.0)
    assert set(cfg.logged_params()) >= {"lora_rank", "alpha_per_rank"} and "adapter_dim" not in cfg.logged_params()
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"), world_data, tmp_path / "storage")
    base, _ = worker.stage1(ctx)
    model, counts = apply_stage(toy_method.load(base, cfg), toy_method.stage2, cfg, toy_method.wrap)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == set(ATTENTION), "LoRA where the toy method did not put it"
    data = ctx.dataset("train", limit=8)
    batch = first_batch(ctx)
    before = batch_loss(model, batch)
    engine, _, _ = worker.train(ctx, model, worker.param_groups(model, cfg), data, 8, "stage2")
    assert batch_loss(engine.module, batch) < 0.9 * before

    out, _ = _save(ctx, engine, tmp_path / "trial")
    uri, run_id = _logged_trial(tmp_path, cfg, out)
    assert export.main([run_id, "--out", str(tmp_path / "export"), "--tracking-uri", uri]) == 0
    from transformers import LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert torch.allclose(logits(merged, batch), logits(engine.module, batch), atol=ATOL)
    assert trial_label({"method": "lora_attn", "model_size": "0.3m", "lora_rank": 4}) == "lora_attn 0.3m r4"


def test_a_label_names_the_resolution_and_mixing_where_they_vary():
    import pandas as pd

    from analysis.plots import varying

    df = pd.DataFrame({"method": ["lora", "lora"], "model_size": ["1m", "1m"], "lora_rank": [16, 16],
                       "image_size": [32, 48], "mix_ratio": [0.2, 0.2]})
    assert varying(df) == ("image_size",)
    assert [trial_label(r, varying(df)) for _, r in df.iterrows()] == ["lora 1m r16 32px", "lora 1m r16 48px"]
    df["mix_ratio"] = [0.0, 0.2]
    assert trial_label(df.iloc[1], varying(df)) == "lora 1m r16 48px mix0.2"


def test_an_unknown_method_is_refused_with_the_registry_named():
    with pytest.raises(ConfigError) as e:
        TrialConfig(method="nope")
    assert str(e.value).startswith("method='nope' is out of range (one of ['full', 'lora', ")


def test_a_method_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(lora.METHOD))
