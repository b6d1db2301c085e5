"""Export a trial as a Hugging Face LLaVA checkpoint: the input of lmms-eval's `llava_hf` and `from_pretrained`.

    python -m study.export RUN_ID --out DIR [--tracking-uri URI] [--base DIR]

The trial's method comes from its MLflow params, and the method registry says how it
exports (trainables.methods: LoRA / QLoRA merged into the base they trained on, full
copied as it is, MMA's adapters beside the base with their own loader). `--base` names
the base checkpoint (the stage-1 result the artifact records) when the study's storage
has moved since. The checkpoint is written into a staging folder beside DIR and renamed
into place only when `from_pretrained` loads it; on any failure nothing is left behind.
Exit 0 on success, 2 on bad input (one `error:` line naming the run / file / flag), 1 otherwise.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--base", help="the base checkpoint the trial trained on, if it moved from where the run "
                                  "recorded it (the stage-1 folder under the study's --storage)")
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


def base_checkpoint(method, artifact: Path, given: str | None, run_id: str) -> Path | None:
    """The checkpoint the artifact was trained on: `--base` if given, else the one it records (None: the
    artifact is a whole model). ExportError when it is not a loadable checkpoint."""
    recorded = method.base_of(artifact)
    if given is None and recorded is None:
        return None
    base = Path(given).resolve() if given is not None else Path(recorded)
    if not (base / "config.json").is_file():
        where = "--base" if given is not None else f"the run's {method.artifact}/ artifact"
        raise ExportError(f"run {run_id}: base checkpoint {base} (from {where}) has no config.json; if the "
                          "study's --storage moved, pass --base with the stage-1 folder's new place")
    return base


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty")


def export(client, run_id: str, out: Path, base: str | None = None) -> Path:
    from transformers import LlavaForConditionalGeneration

    from trainables.methods import METHODS

    cfg, run = trial_of(client, run_id)
    method = METHODS[cfg.method]
    check_out(out)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            artifact = Path(client.download_artifacts(run_id, method.artifact, tmp))
        except Exception:  # MLflow raises several kinds for a missing artifact
            raise ExportError(f"run {run_id}: has no {method.artifact}/ artifact (did the trial finish saving?)") \
                from None
        base_dir = base_checkpoint(method, artifact, base, run_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
        try:
            method.export(artifact, cfg, staging, base_dir)
            LlavaForConditionalGeneration.from_pretrained(staging)  # what lmms-eval will do; fail here, not there
            if out.exists():
                out.rmdir()  # empty (checked above)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded
    return out


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    from tracking.store import resolve_uri

    try:
        args = _parser().parse_args(argv)
        uri = resolve_uri(args.tracking_uri)
        out = export(MlflowClient(uri), args.run_id, Path(args.out).resolve(), args.base)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported run {args.run_id} to {out}")
    print(f"load it with: LlavaForConditionalGeneration.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
