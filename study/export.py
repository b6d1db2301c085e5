"""Export a trial as a Hugging Face LLaVA checkpoint: the input of lmms-eval's `llava_hf` and `from_pretrained`.

    python -m study.export RUN_ID --out DIR [--tracking-uri URI]

The trial's method comes from its MLflow params, never from folder names:
- lora / qlora: the `adapter/` artifact merged into its base (the stage-1 checkpoint its
  adapter config names). QLoRA merges into the dequantized NF4 base it was trained on,
  so the export computes what the trial evaluated.
- full: the `model/` artifact is already a checkpoint; it is copied and checked.
- mma: the base LLaVA plus `mma/` (adapter weights, config), loaded with
  `trainables.methods.mma.MMAModel.from_pretrained(DIR / "mma", base=DIR)`; no stock
  class knows LaVIN's adapters.
Exit 0 on success, 2 on bad input (one `error:` line naming the run / file), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


class ExportError(Exception):
    """Reported as one `error:` line and exit code 2."""


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ExportError(message)

    p = Parser(prog="python -m study.export", description=__doc__.splitlines()[0])
    p.add_argument("run_id", help="MLflow run id of a trial (a nested run of a study)")
    p.add_argument("--out", required=True, help="directory to write the checkpoint to (must not exist or be empty)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    return p


def trial_of(client, run_id: str):
    """(TrialConfig, run) of a finished trial run, or ExportError naming what is wrong."""
    from mlflow.exceptions import MlflowException

    from trainables.config import ConfigError, TrialConfig

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ExportError(f"run {run_id}: no such run in this tracking store") from None
    if "method" not in run.data.params:
        raise ExportError(f"run {run_id}: has no 'method' param; is it a study's parent run rather than a trial?")
    if run.info.status != "FINISHED":
        raise ExportError(f"run {run_id}: status {run.info.status}, only finished trials are exported")
    try:
        return TrialConfig.from_params(run.data.params), run
    except ConfigError as e:
        raise ExportError(f"run {run_id}: {e}") from None


def _base_of(artifact: Path, config_name: str, key: str, run_id: str) -> Path:
    base = Path(json.loads((artifact / config_name).read_text())[key])
    if not (base / "config.json").exists():
        raise ExportError(f"run {run_id}: base checkpoint {base} (from {artifact.name}/{config_name}) is gone; "
                          "was the study's --storage moved or deleted?")
    return base


def merge_lora(adapter: Path, cfg, run_id: str):
    """The trained LLaVA with its LoRA merged (QLoRA: into the dequantized 4-bit base it trained on)."""
    from peft import PeftModel

    from trainables.methods.qlora import quantization_config
    from trainables.model import load_llava

    base_dir = _base_of(adapter, "adapter_config.json", "base_model_name_or_path", run_id)
    quantization = quantization_config(cfg)
    base = load_llava(base_dir, cfg.replace(use_gpu=False), quantization)
    if quantization is not None:
        base = base.dequantize()  # NF4 -> fp32, exactly the weights the adapter was trained against
    return PeftModel.from_pretrained(base, adapter).merge_and_unload(), base_dir


def export(client, run_id: str, out: Path) -> Path:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from trainables.methods import METHODS

    cfg, run = trial_of(client, run_id)
    method = METHODS[cfg.method]
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            artifact = Path(client.download_artifacts(run_id, method.artifact, tmp))
        except Exception:  # MLflow raises several kinds for a missing artifact
            raise ExportError(f"run {run_id}: has no {method.artifact}/ artifact (did the trial finish saving?)") \
                from None
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".export-"))  # renamed into place when complete
        if cfg.method in ("lora", "qlora"):
            model, base_dir = merge_lora(artifact, cfg, run_id)
            model.save_pretrained(staging)
            AutoProcessor.from_pretrained(base_dir).save_pretrained(staging)
        elif cfg.method == "full":
            shutil.copytree(artifact, staging, dirs_exist_ok=True)
        else:  # mma: its own loader; the base LLaVA is written beside it so the folder is self-contained
            base_dir = _base_of(artifact, "mma_config.json", "base_model_name_or_path", run_id)
            LlavaForConditionalGeneration.from_pretrained(base_dir).save_pretrained(staging)
            AutoProcessor.from_pretrained(base_dir).save_pretrained(staging)
            shutil.copytree(artifact, staging / "mma")
            conf = json.loads((staging / "mma" / "mma_config.json").read_text())
            conf["base_model_name_or_path"] = ".."  # relative: the folder can be moved whole
            (staging / "mma" / "mma_config.json").write_text(json.dumps(conf, indent=2))
        LlavaForConditionalGeneration.from_pretrained(staging)  # what lmms-eval will do; fail here, not there
        if out.exists():
            out.rmdir()
        staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    from tracking.store import resolve_uri

    try:
        args = _parser().parse_args(argv)
        uri = resolve_uri(args.tracking_uri)
        out = export(MlflowClient(uri), args.run_id, Path(args.out).resolve())
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported run {args.run_id} to {out}")
    print(f"load it with: LlavaForConditionalGeneration.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
