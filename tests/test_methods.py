"""Every two-stage method on the zoo's smallest LLaVA, with real DeepSpeed, PEFT and bitsandbytes on one gloo rank.

Each method trains a few steps on one fixed batch and must lower its loss; its
trainable-parameter count must equal a count computed here from the model's shapes;
its artifact, loaded with stock transformers + peft, must give the trained model's
logits; `python -m study.export` must turn it into a checkpoint `from_pretrained` loads.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from support import first_batch
from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

from study import export
from trainables import worker
from trainables.config import ConfigError, TrialConfig
from trainables.methods import METHODS, apply_stage
from trainables.methods.lora import TARGETS
from trainables.methods.qlora import exact_cpu_kernels

# fp32 on CPU: a reload computes the same numbers up to summation order.
ATOL = 1e-4


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def tuned(method: str, world_data, tmp_path_factory, zero_stage: int = 2, steps: int = 8):
    """(cfg, ctx, base, engine, counts, loss before, loss after, batch) after `steps` steps on one batch of 8."""
    lr = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2}[method]
    cfg = TrialConfig(method=method, model_size="0.3m", stage1_steps=4, batch_size=8, lr=lr, zero_stage=zero_stage)
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"), world_data, tmp_path_factory.getbasetemp() / "storage")
    base, _ = worker.stage1(ctx)
    m = METHODS[method]
    model, counts = apply_stage(m.load(base, cfg), m.stage2, cfg, m.wrap)
    data = ctx.dataset("train", limit=8)
    batch = first_batch(ctx)
    before = batch_loss(model, batch)
    engine, _, _ = worker.train(ctx, model, worker.param_groups(model, cfg), data, steps, "stage2")
    return cfg, ctx, base, engine, counts, before, batch_loss(engine.module, batch), batch


def lora_count(text_config, rank: int) -> int:
    """r x (fan_in + fan_out) for every adapted linear layer of the Llama LLM."""
    d, inter = text_config.hidden_size, text_config.intermediate_size
    heads, kv = text_config.num_attention_heads, text_config.num_key_value_heads
    hd = getattr(text_config, "head_dim", None) or d // heads
    shapes = {"q_proj": (d, heads * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (heads * hd, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    assert set(shapes) == set(TARGETS)
    return text_config.num_hidden_layers * sum(rank * (i + o) for i, o in shapes.values())


def projector_count(config) -> int:
    v, d = config.vision_config.hidden_size, config.text_config.hidden_size
    return v * d + d + d * d + d  # LLaVA's 2-layer MLP


@pytest.fixture(scope="module")
def runs(world_data, process_group, tmp_path_factory):
    return {"data": world_data}


def _get(runs, key, tmp_path_factory):
    if key not in runs:
        method, zero = key
        runs[key] = tuned(method, runs["data"], tmp_path_factory, zero)
    return runs[key]


CASES = [("lora", 2), ("qlora", 2), ("qlora", 3), ("full", 2), ("full", 3)]


@pytest.mark.parametrize("key", CASES, ids=lambda k: f"{k[0]}-zero{k[1]}")
def test_method_lowers_loss_and_trains_what_its_table_says(runs, tmp_path_factory, key):
    cfg, ctx, base, engine, counts, before, after, batch = _get(runs, key, tmp_path_factory)
    assert after < 0.9 * before, f"{key}: loss {before:.3f} -> {after:.3f}"
    config = LlavaForConditionalGeneration.from_pretrained(base).config
    assert counts["vision_tower"] == 0
    assert counts["projector"] == projector_count(config)
    if cfg.method == "full":
        plain = LlavaForConditionalGeneration.from_pretrained(base)
        llm = sum(p.numel() for n, p in plain.named_parameters()
                  if n.startswith(("model.language_model.", "lm_head.")))
        assert counts["llm"] == llm
    else:
        assert counts["llm"] == lora_count(config.text_config, cfg.lora_rank)


@pytest.mark.parametrize("zero_stage", [2, 3], ids=["zero2", "zero3"])
def test_qlora_base_layers_are_4bit_nf4(runs, tmp_path_factory, zero_stage):
    import bitsandbytes as bnb

    cfg, ctx, base, engine, *_ = _get(runs, ("qlora", zero_stage), tmp_path_factory)
    layers = {n: m for n, m in engine.module.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    llm_linears = [n for n, m in engine.module.named_modules()
                   if n.endswith(TARGETS) and "language_model" in n and "lora" not in n]
    # PEFT wraps each adapted layer; the frozen base it adds LoRA to is `<name>.base_layer`.
    assert llm_linears and all(f"{n}.base_layer" in layers for n in llm_linears), "an LLM linear layer is not 4-bit"
    for n, m in layers.items():
        assert "language_model" in n, f"{n} is quantized but only the LLM should be"
        # under ZeRO-3 the packed 4-bit weights are stored in the compute dtype, which DeepSpeed partitions
        assert m.weight.dtype == (torch.float32 if zero_stage == 3 else torch.uint8), (n, m.weight.dtype)
        assert m.weight.quant_state.quant_type == "nf4"
        assert m.weight.quant_state.nested, "double quantization is off"
        if zero_stage == 3:  # a ZeRO-3 parameter: DeepSpeed holds this rank's partition of the packed weight
            assert m.weight.ds_tensor.dtype == torch.float32 and m.weight.ds_numel == m.in_features * m.out_features // 8, n
    projector = engine.module.base_model.model.model.multi_modal_projector
    assert all(p.dtype == torch.float32 for p in projector.parameters())


def test_qlora_with_zero3_needs_a_bitsandbytes_with_quant_storage(monkeypatch):
    from trainables.methods import stages

    assert TrialConfig(method="qlora", zero_stage=3).zero_stage == 3
    monkeypatch.setattr(stages, "installed", lambda package: "0.42.0")
    with pytest.raises(ConfigError, match=r"zero_stage=3 with method=qlora needs bitsandbytes >= 0.43.0 .*"
                                          r"installed: 0.42.0. Upgrade bitsandbytes, or use zero_stage=2"):
        TrialConfig(method="qlora", zero_stage=3)
    assert TrialConfig(method="qlora", zero_stage=2).zero_stage == 2


def _save(ctx, engine, tmp_path):
    out = tmp_path / METHODS[ctx.cfg.method].artifact
    size = worker.save_artifact(ctx, engine, out)
    assert size > 0 and not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")), "not safetensors only"
    return out, size


@pytest.mark.parametrize("method, zero_stage", [("lora", 2), ("qlora", 2), ("qlora", 3)],
                         ids=["lora", "qlora", "qlora-zero3"])
def test_adapter_reloads_with_stock_peft_to_the_same_logits(runs, tmp_path_factory, tmp_path, method, zero_stage):
    from peft import PeftModel

    cfg, ctx, base, engine, *_, batch = _get(runs, (method, zero_stage), tmp_path_factory)
    out, _ = _save(ctx, engine, tmp_path)
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == str(base)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"]) \
        if method == "qlora" else None
    stock = exact_cpu_kernels(LlavaForConditionalGeneration.from_pretrained(base_path, quantization_config=quant))
    reloaded = PeftModel.from_pretrained(stock, out)
    assert torch.allclose(logits(reloaded, batch), logits(engine.module, batch), atol=ATOL)


@pytest.mark.parametrize("key", [("full", 2), ("full", 3)], ids=["zero2", "zero3"])
def test_full_model_artifact_is_a_llava_checkpoint(runs, tmp_path_factory, tmp_path, key):
    cfg, ctx, base, engine, *_, batch = _get(runs, key, tmp_path_factory)
    out, size = _save(ctx, engine, tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert torch.allclose(logits(loaded, batch), logits(engine.module, batch), atol=ATOL)
    lora_out, lora_size = _save(*_get(runs, ("lora", 2), tmp_path_factory)[1:4:2], tmp_path / "lora")
    assert size > 3 * lora_size, "a full checkpoint should dwarf an adapter"


def _logged_trial(tmp_path, cfg, artifact: Path):
    """A finished trial run in a real SQLite MLflow store, as study.run leaves it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("export", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    for key, value in cfg.to_dict().items():
        client.log_param(run.info.run_id, key, value)
    client.log_artifacts(run.info.run_id, str(artifact), artifact.name)
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


@pytest.mark.parametrize("key", [("lora", 2), ("qlora", 2), ("full", 3)], ids=lambda k: k[0])
def test_export_gives_a_merged_checkpoint_with_the_trained_logits(runs, tmp_path_factory, tmp_path, key):
    cfg, ctx, base, engine, *_, batch = _get(runs, key, tmp_path_factory)
    out, _ = _save(ctx, engine, tmp_path / "trial")
    uri, run_id = _logged_trial(tmp_path, cfg, out)
    assert export.main([run_id, "--out", str(tmp_path / "export"), "--tracking-uri", uri]) == 0
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert not any("lora_" in n for n, _ in merged.named_parameters()), "LoRA not merged"
    assert (tmp_path / "export" / "processor_config.json").exists() or \
        (tmp_path / "export" / "preprocessor_config.json").exists()
    assert torch.allclose(logits(merged, batch), logits(engine.module, batch), atol=ATOL)


def test_export_refuses_bad_runs_by_name(zoo_ready, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("bad")
    parent = client.create_run(exp).info.run_id
    assert export.main(["nope", "--out", str(tmp_path / "o"), "--tracking-uri", uri]) == 2
    assert "run nope: no such run" in capsys.readouterr().err
    assert export.main([parent, "--out", str(tmp_path / "o"), "--tracking-uri", uri]) == 2
    assert f"run {parent}: has no 'method' param" in capsys.readouterr().err


def test_export_keeps_mma_with_its_loader(world_data, process_group, tmp_path):
    from trainables.methods.mma import MMAModel

    cfg = TrialConfig(method="mma", model_size="0.3m", batch_size=8, lr=1e-2, neck_every=1)
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"), world_data, tmp_path / "storage")
    base, meta = worker.stage1(ctx)
    assert meta["trainable_params"] == 0, "MMA is single-stage"
    m = METHODS["mma"]
    model, _ = apply_stage(m.load(base, cfg), m.stage2, cfg, m.wrap)
    data = ctx.dataset("train", limit=8)
    engine, _, _ = worker.train(ctx, model, worker.param_groups(model, cfg), data, 3, "stage2")
    out, _ = _save(ctx, engine, tmp_path / "trial")
    uri, run_id = _logged_trial(tmp_path, cfg, out)
    assert export.main([run_id, "--out", str(tmp_path / "export"), "--tracking-uri", uri]) == 0
    moved = tmp_path / "moved"
    (tmp_path / "export").rename(moved)  # the exported folder is self-contained
    loaded = MMAModel.from_pretrained(moved / "mma")
    batch = first_batch(ctx)
    assert torch.allclose(logits(loaded, batch), logits(engine.module, batch), atol=ATOL)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_the_model_card_says_how_to_load_the_artifact(runs, tmp_path_factory, tmp_path, method):
    """The artifact's README.md (not PEFT's blank template) names the base, the method, the params and the
    metrics, and its Python snippet, run as written, loads the trained model (the same logits)."""
    from trainables import model_card

    cfg, ctx, base, engine, *_, batch = _get(runs, (method, 2), tmp_path_factory)
    out, _ = _save(ctx, engine, tmp_path)
    model_card.write(out, cfg, {"score": 61.25, "gpu_hours": 1.5e-3, "trainable_params": 44736.0},
                     str(base), study="card study", trial="1m r8", run_id="abc123")
    card = (out / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {base}\n") and "Fill in" not in card and "[More Information" not in card
    assert "study `card study`, trial `1m r8` (MLflow run `abc123`)" in card
    assert "| score | 61.2 | 0-100 |" in card and f"| lr | {cfg.lr} |" in card
    assert ("| lora_rank |" in card) == (method != "full")  # only the params that apply
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    cwd = os.getcwd()
    try:
        os.chdir(out.parent)  # the snippet names the artifact's folder, as it sits beside the card's reader
        exec(snippet, namespace)
    finally:
        os.chdir(cwd)
    loaded = exact_cpu_kernels(namespace["model"])
    assert torch.allclose(logits(loaded, batch), logits(engine.module, batch), atol=ATOL)
