"""The model card (`README.md`) in every saved artifact: what was trained, how, how well, and how to load it.

    write(out, cfg, result, base, trial=..., study=..., run_id=...)   # after the method's save, rank 0 only

PEFT's `save_pretrained` writes a blank template card into an adapter folder; this replaces it
(and adds one to the full model and MMA folders). The card starts with Hugging Face's YAML
metadata block (`base_model`, `library_name`, `tags`), so the Hub and `huggingface_hub.ModelCard`
read it; the loading snippet comes from the method's registry entry (`Method.how_to_load`).
"""

from __future__ import annotations

from pathlib import Path

from tracking.metrics import spec

# The metrics a reader of the card wants first (the rest are on the trial's MLflow run).
CARD_METRICS = ("score", "text_score", "gpu_hours", "dollars", "trainable_params", "peak_mem_gb",
                "samples_per_s", "final_train_loss")


def render(cfg, result: dict, base: str, trial: str = "", study: str = "", run_id: str = "",
           artifact: str = "") -> str:
    """The card's Markdown text. `base`: the checkpoint the artifact was trained on (stage 1's output, or
    the assembled model for a single-stage method); `result`: the trial's final metrics."""
    from trainables.methods import METHODS

    method = METHODS[cfg.method]
    library = method.library
    lines = ["---", f"base_model: {base}", f"library_name: {library}",
             "tags: [llava, visual-instruction-tuning, mmscale, " + method.name + "]", "---", "",
             f"# {method.label(cfg.logged_params())} ({cfg.model_size})", "",
             f"Trained by mmscale{f' in study `{study}`' if study else ''}"
             f"{f', trial `{trial}`' if trial else ''}{f' (MLflow run `{run_id}`)' if run_id else ''}.",
             "", f"**Method**: {method.name}: {method.description}.", "",
             f"**Base model**: `{base}` (model size `{cfg.model_size}`, image size {cfg.image_size} px).", "",
             "## Metrics", "", "| metric | value | unit |", "|---|---|---|"]
    for key in CARD_METRICS:
        if key in result and result[key] == result[key]:  # NaN: not measured
            m = spec(key)
            lines.append(f"| {key} | {m.fmt.format(result[key])} | {m.unit} |")
    lines += ["", "## Hyperparameters", "", "| param | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(cfg.logged_params().items())]
    lines += ["", "## How to load it", "", "```python",
              method.how_to_load.format(base=base, artifact=artifact or method.artifact).strip(), "```", ""]
    return "\n".join(lines)


def write(out: Path, cfg, result: dict, base: str, **about) -> Path:
    """`out/README.md` (replacing PEFT's template); returns its path."""
    path = Path(out) / "README.md"
    path.write_text(render(cfg, result, str(base), artifact=Path(out).name, **about), encoding="utf-8")
    return path
