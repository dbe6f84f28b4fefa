"""Experiment trackers (``train.tracker``): one TensorBoard folder or W&B run per run folder, across requeues.

accelerate's trackers do the logging (rank 0 only). What they leave to us, and what users of the reference
script trip over:

* **One run, not one per attempt.** A requeued job starts a new process; without help, TensorBoard gets a
  second event file whose steps overlap the first, and W&B a brand-new run. Here TensorBoard's writer gets
  ``purge_step`` = the step after the resumed one, so events that a lost attempt logged past its last
  checkpoint are dropped and the curve goes on without a fork; W&B gets the run id kept in
  ``<run>/tracker.json`` (written once, atomically) with ``resume="allow"``, and the training step as a
  value, since a resumed W&B run drops anything logged at a step below its last.
* **No token in hparams.** accelerate writes the config it is given to ``hparams.yml`` (the seed's script
  leaked the hub token that way). We give it the semantic config only, flattened, and every string passes
  through :func:`sdcluster.redaction.redact`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcluster.atomic import write_json
from sdcluster.config import Config, ConfigError
from sdcluster.identity import semantic_train_config
from sdcluster.paths import RunPaths
from sdcluster.redaction import redact

if TYPE_CHECKING:
    from accelerate import Accelerator

WANDB_STEP = "train/step"  # the training step, logged as a value to W&B (see start)


def check_installed(cfg: Config) -> None:
    """Fail before queueing when the tracker's package is missing (the job would only fail at its start)."""
    package = cfg.train.tracker  # each tracker's package has its name
    if package != "none" and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"train.tracker={cfg.train.tracker} needs the {package} package, which is not installed. "
            f"Fix: pip install {package}, or train.tracker=none (metrics.jsonl is always written)"
        )


def accelerator_kwargs(cfg: Config, paths: RunPaths) -> dict[str, Any]:
    """``log_with``/``project_dir`` for the Accelerator: the run folder is the logging root."""
    if cfg.train.tracker == "none":
        return {}
    return {"log_with": cfg.train.tracker, "project_dir": str(paths.root)}


def hparams(cfg: Config) -> dict[str, Any]:
    """The semantic config flattened to ``section.key`` scalars (what TensorBoard takes), strings redacted."""
    flat: dict[str, Any] = {"task": cfg.task}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, (bool, int, float)) or node is None:
            flat[prefix] = node if node is not None else "none"
        else:
            flat[prefix] = redact(node if isinstance(node, str) else json.dumps(node, default=str))

    walk(semantic_train_config(cfg), "")
    walk({"generate": dataclasses.asdict(cfg.generate)}, "")
    return flat


def wandb_run_id(paths: RunPaths) -> str:
    """The run folder's W&B id: made on the first start, read back by every requeue and rerun."""
    record = paths.tracker
    if record.is_file():
        return json.loads(record.read_text())["wandb_run_id"]
    run_id = uuid.uuid4().hex[:16]
    write_json(record, {"wandb_run_id": run_id, "run_dir": str(paths.root)})
    return run_id


def start(acc: Accelerator, cfg: Config, paths: RunPaths, step: int) -> None:
    """Open the tracker at ``step`` (after the resume). Every rank calls it; only rank 0 touches files."""
    if cfg.train.tracker == "none":
        return
    if cfg.train.tracker == "tensorboard":
        # A checkpoint at step k is saved after step k was logged: only events past k are stale.
        init = {"tensorboard": {"purge_step": step + 1}}
        name = "tensorboard"
    else:
        run_id = wandb_run_id(paths) if acc.is_main_process else ""
        init = {"wandb": {"id": run_id, "resume": "allow", "dir": str(paths.root), "name": paths.root.name}}
        name = cfg.train.tracker_project
    acc.init_trackers(name, config=hparams(cfg), init_kwargs=init)
    if cfg.train.tracker == "wandb" and acc.is_main_process:
        # A resumed W&B run refuses a step below its last one ("step must only increase"): after a resume
        # the validation of step k and any step redone after a crash would be dropped. So W&B's own step
        # only counts calls, and every chart is drawn against the training step logged as a value.
        acc.get_tracker("wandb", unwrap=True).define_metric("*", step_metric=WANDB_STEP)


def _values(cfg: Config, values: dict[str, Any], step: int) -> tuple[dict[str, Any], int | None]:
    """What to log and the step to pass: W&B gets the step as a value instead (see :func:`start`)."""
    if cfg.train.tracker == "wandb":
        return {**values, WANDB_STEP: step}, None
    return values, step


def log(acc: Accelerator, cfg: Config, values: dict[str, float], step: int) -> None:
    if cfg.train.tracker != "none":
        values, at = _values(cfg, values, step)
        acc.log(values, step=at)


def log_image(acc: Accelerator, cfg: Config, name: str, path: Path, step: int) -> None:
    """One image file (a validation grid) into the tracker, as accelerate's trackers each want it."""
    if cfg.train.tracker == "none" or not acc.is_main_process:
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    if cfg.train.tracker == "tensorboard":
        acc.get_tracker("tensorboard").log_images({name: pixels[None]}, step=step, dataformats="NHWC")
    else:
        import wandb

        values, _ = _values(cfg, {name: [wandb.Image(pixels)]}, step)
        acc.get_tracker("wandb", unwrap=True).log(values)


def end(acc: Accelerator, cfg: Config) -> None:
    """Flush and close (TensorBoard's writer buffers; W&B marks the run finished or resumable)."""
    if cfg.train.tracker != "none":
        acc.end_training()
