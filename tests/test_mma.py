"""MMA (LaVIN) on the zoo's smallest LLM: parameter counts, routing, identity at init, training, save/load,
batch-invariant generation, and a DeepSpeed ZeRO-2 step on a real one-rank gloo group."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, CLIPVisionConfig

import trainables.methods.mma as mma
from support import batch as batch_of
from support import assert_world_scores, collate_for, dataset_of

from trainables import worker
from trainables.config import TrialConfig
from trainables.data.loader import eval_loader
from trainables.evaluate import generate_answers
from trainables.methods import apply_stage, check_stage
from trainables.model import build_llava, build_processor, llm_id, vision_id


@pytest.fixture(scope="module")
def prepared(zoo_ready, tmp_path_factory):
    """cfg, processor, the base LLaVA checkpoint (what a 0-step stage 1 saves), the world's directory, a tmp dir."""
    world_dir, _ = zoo_ready
    cfg = TrialConfig(method="mma", model_size="0.3m", batch_size=4, stage2_steps=2, eval_samples=8)
    processor = build_processor(cfg)
    base = tmp_path_factory.mktemp("base")
    build_llava(cfg, processor).save_pretrained(base)
    processor.save_pretrained(base)
    return cfg, processor, base, world_dir, tmp_path_factory.mktemp("shards")


def encoded(prepared, for_generation=False, n=4):
    """n image samples then n text-only samples, as a dataset a trial reads."""
    cfg, processor, base, root, tmp = prepared
    names = ("eval.json", "text_eval.json") if for_generation else ("train.json", "text.json")
    records = [r for name in names for r in json.loads((root / name).read_text())[:n]]
    return dataset_of(records, processor, root / "images", tmp, for_generation)


def collate(prepared, left=False):
    cfg, processor = prepared[:2]
    return collate_for(processor, mma.image_tokens(processor, cfg), cfg.max_length, left)


def mixed_batch(prepared, n=4) -> dict:
    rows = [i for pair in zip(range(n), range(n, 2 * n)) for i in pair]  # image, text, image, text, ...
    return batch_of(encoded(prepared, n=n), rows, collate(prepared))


def fresh(prepared, **changes):
    cfg, processor, base, root, _ = prepared
    cfg = cfg.replace(**changes)
    return apply_stage(mma.METHOD.load(base, cfg), mma.METHOD.stage2, cfg, mma.wrap)


def perturbed(prepared) -> mma.MMAModel:
    """Adapters as after training: non-zero ups, routers strong enough to pick an expert."""
    model, _ = fresh(prepared)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mma_" in name:
                p.add_(torch.randn_like(p) * (1.0 if "router" in name else 0.1))
    return model.eval()


def test_trainable_params_match_the_formulas(prepared):
    cfg, processor, base, root, _ = prepared
    a = cfg.adapter_dim
    text, vision = AutoConfig.from_pretrained(llm_id(cfg.model_size)), CLIPVisionConfig.from_pretrained(vision_id(cfg))

    def adapters(dim, layers):  # down, two ups, router on a dim-wide routing vector
        return layers * ((dim * a + a) + 2 * (a * dim + dim) + (dim * 2 + 2))

    neck = (vision.hidden_size * cfg.neck_dim + cfg.neck_dim) + (cfg.neck_dim * text.hidden_size + text.hidden_size)
    expected = {"vision_tower": adapters(vision.hidden_size, vision.num_hidden_layers), "projector": 0,
                "neck": neck + 2 * text.hidden_size, "llm": adapters(text.hidden_size, text.num_hidden_layers)}
    for neck_every in (4, 1):  # the neck's MLP is shared by its layers: fewer layers, same parameters
        model, counts = fresh(prepared, neck_every=neck_every)
        assert counts == expected
        assert model.image_tokens == mma.image_tokens(processor, cfg.replace(neck_every=neck_every))
    assert mma.image_tokens(processor, cfg) == 1 + 1 and model.image_tokens == 1 + 4  # 4 vision layers
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "llava.model.language_model.layers.0.self_attn.mma_adapter.down.weight" in names
    assert "llava.model.vision_tower.encoder.layers.3.self_attn.mma_adapter.router.weight" in names
    with pytest.raises(ValueError, match="neck_every=5"):
        mma.image_tokens(processor, cfg.replace(neck_every=5))


def test_llm_routers_route_on_the_modality_token(prepared):
    model = perturbed(prepared)
    batch = mixed_batch(prepared, n=1)  # row 0 an image sample, row 1 text-only
    seen = []
    llm = [layer.self_attn.mma_adapter for layer in model.llava.model.language_model.layers]
    hooks = [ad.router.register_forward_hook(lambda m, i, o: seen.append(o)) for ad in llm]
    with torch.no_grad():
        model(**batch)
        for hook in hooks:
            hook.remove()
        modality = model.mma_neck.modality.weight[[1, 0]]  # image, text
        for adapter, logits in zip(llm, seen):
            weights = torch.softmax(logits / adapter.router_temperature, dim=-1)
            assert torch.allclose(weights, adapter.weights(modality))
            assert (weights[0] - weights[1]).abs().max() > 0.05, weights


def test_vision_routers_route_per_image(prepared):
    model = perturbed(prepared)
    pixels = batch_of(encoded(prepared, n=2), [0, 1], collate(prepared))["pixel_values"]
    # layer 0's [CLS] input is the class embedding alone, the same for every image; later ones have seen it
    adapter = model.llava.model.vision_tower.encoder.layers[1].self_attn.mma_adapter
    seen = []
    hook = adapter.router.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model.llava.model.vision_tower(pixels)
    hook.remove()
    weights = torch.softmax(seen[0] / adapter.router_temperature, dim=-1)
    assert weights.shape == (2, 2) and (weights[0] - weights[1]).abs().max() > 1e-3


def test_text_only_at_init_is_the_base_llm(prepared):
    cfg, processor, base, root, _ = prepared
    model, _ = fresh(prepared)
    batch = batch_of(encoded(prepared), [4, 5, 6, 7], collate(prepared))  # the text-only samples
    with torch.no_grad():
        ours = model(**batch).logits
        reference = mma.METHOD.load(base, cfg)(**batch).logits
    # zero-initialised ups make every adapter exactly the identity (bit-equal on CPU); 1e-6 leaves room for kernels
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6)


def test_a_few_steps_lower_the_loss_and_touch_only_mma(prepared):
    model, _ = fresh(prepared)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "mma_" not in n}
    batch = mixed_batch(prepared)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "mma_" not in n)


def test_save_and_load_reproduce_the_logits(prepared, tmp_path):
    cfg, processor, base, root, _ = prepared
    model = perturbed(prepared)
    batch = mixed_batch(prepared)
    model.save_pretrained(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"adapter_model.safetensors", "mma_config.json"}
    saved = json.loads((tmp_path / "mma_config.json").read_text())
    assert saved == {"adapter_dim": 8, "router_temperature": 10.0, "neck_dim": 128, "neck_every": 4,
                     "base_model_name_or_path": str(base)}
    loaded = mma.MMAModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "adapter_model.safetensors")
    state.pop(next(k for k in state if "mma_neck" in k))
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        mma.MMAModel.from_pretrained(tmp_path)


def test_generation_is_the_same_at_any_batch_size(prepared):
    cfg, processor, base, root, _ = prepared
    model = perturbed(prepared)
    data = encoded(prepared, for_generation=True)
    rows = [i for pair in zip(range(4), range(4, 8)) for i in pair]
    tok = processor.tokenizer
    left = collate(prepared, left=True)
    one = generate_answers(model, eval_loader(data, rows, 1, left), tok, 6, torch.device("cpu"))
    four = generate_answers(model, eval_loader(data, rows, 4, left), tok, 6, torch.device("cpu"))
    assert one == four and len(set(one.values())) > 1, one
    # the prompt comes back first, and the first new token is what forward predicts
    batch = batch_of(data, [0], left)
    batch.pop("labels")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(out[:, :-1], batch["input_ids"])
        assert out[0, -1] == model(**batch).logits[0, -1].argmax()


def test_zero2_step_and_save_under_deepspeed(prepared, process_group, tmp_path):
    import deepspeed

    cfg = prepared[0]
    model, _ = fresh(prepared)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=worker.deepspeed_config(cfg, 1),
                                      dist_init_required=False)
    loss = engine(**mixed_batch(prepared, n=2)).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
    check_stage(engine.module, mma.METHOD.stage2)
    up = engine.module.llava.model.language_model.layers[0].self_attn.mma_adapter.up[0].weight
    assert up.abs().sum() > 0, "the up-projection never left zero"
    mma.METHOD.save(SimpleNamespace(rank=0, cfg=cfg), engine, tmp_path / "mma")
    assert {f.name for f in (tmp_path / "mma").iterdir()} == {"adapter_model.safetensors", "mma_config.json"}


class Losses:
    """What the worker logs per step (a TrialLog's interface, kept in memory)."""

    def __init__(self):
        self.values: dict[int, float] = {}

    def metric(self, key: str, value: float, step: int) -> None:
        self.values[step] = value

    def flush(self) -> None:
        pass


def test_the_worker_trains_and_evaluates_mma(prepared, world_data, process_group, tmp_path):
    cfg, processor, base, root, _ = prepared
    cfg = cfg.replace(stage2_steps=12, batch_size=8, lr=1e-2)
    log = Losses()
    ctx = worker.setup(cfg, 0, 1, torch.device("cpu"), world_data, tmp_path, log)
    assert ctx.image_tokens == 2 and worker.stage1_steps(ctx) == 0
    engine, counts, seconds, loss, mix = worker.stage2(ctx, base)
    assert counts["projector"] == 0 and mix == 0
    losses = [log.values[step] for step in sorted(log.values)]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    scores = worker.evaluate(ctx, engine)
    assert_world_scores(scores)
    assert scores["multiple_choice"] == 0
