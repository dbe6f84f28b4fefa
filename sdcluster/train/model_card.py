"""The model card every export carries, in the file and format the Hugging Face hub reads (huggingface_hub's
``ModelCard``, ``constants.REPOCARD_NAME``), describing the run to whoever receives its result.

Everything comes from the run folder's own records, beside the export: ``config.yaml`` (the resolved config
of the attempt that exported, written with tokens masked), ``metrics.jsonl`` (the validation losses),
``validation/step-N/grid.png`` (copied in as ``validation.png``, so the card shows it wherever the folder
goes), and the base model's own card for its license. The metadata block says what the hub uses
(``base_model``, ``license``, ``library_name``, ``tags``) and, under ``sdcluster``, the run's numbers. The
text passes through :func:`sdcluster.redaction.redact` last: no token reaches the card.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub.constants import REPOCARD_NAME

from sdcluster import identity
from sdcluster.config.generate import LORA_WEIGHTS
from sdcluster.model_source import is_hub_id
from sdcluster.paths import RunPaths
from sdcluster.redaction import redact
from sdcluster.train import metrics
from sdcluster.train.rerun import launch_command

if TYPE_CHECKING:
    from sdcluster.config import Config
    from sdcluster.models.family import Family

log = logging.getLogger("sdcluster")

CARD_FILE = REPOCARD_NAME  # the file the hub shows as a repo's card
GRID_FILE = "validation.png"


def run_config(run_root: Path) -> Config | None:
    """The run's resolved config, read back from its ``config.yaml``; None outside a run folder."""
    from omegaconf import OmegaConf

    from sdcluster.config import store

    file = RunPaths(run_root).config
    if not file.is_file():
        return None
    written = OmegaConf.load(file)
    merged = OmegaConf.merge(store.schema_for(written), written)  # typed for the optimizer it names
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _base_license(cfg: Config) -> str | None:
    """The base model's license as its own card states it: the card in a local folder, or a hub model's
    card when the hub cache holds it at the trained commit (jobs run offline: nothing is downloaded)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    model = cfg.model
    card: str | Path | None = None
    if is_hub_id(model.path):
        found = try_to_load_from_cache(
            model.path, CARD_FILE, cache_dir=model.cache_dir, revision=model.commit or model.revision
        )
        card = found if isinstance(found, str) else None
    elif (Path(model.path) / CARD_FILE).is_file():
        card = Path(model.path) / CARD_FILE
    if card is None:
        return None
    try:
        return ModelCard.load(card).data.license
    except (ValueError, yaml.YAMLError) as err:  # its metadata does not parse: the card says no license
        log.warning("model card: the license of %s is unknown, its card does not parse (%s)", card, err)
        return None


def _dataset(cfg: Config) -> dict[str, Any]:
    """Name, path, image count and the sha256 of ``metadata.jsonl`` (captions and file list); with
    ``data.sources``, the same for each source (with its repeats and hub commit) under ``sources``."""
    from sdcluster.data.sources import holdout_of, sources_of

    if not cfg.data.sources:
        return _folder(cfg.data.name, cfg.data.path, cfg.data.caption_column) | {"holdout": cfg.data.holdout}
    sources = []
    for index, source in enumerate(sources_of(cfg.data)):
        found = _folder(source.name or f"source {index}", source.path, source.caption_column)
        found |= {"repeats": source.repeats, "holdout": holdout_of(cfg.data, source)}
        sources.append(found | ({"commit": source.commit} if source.hub else {}))
    return {
        "name": cfg.data.name,
        "images": sum(s["images"] for s in sources),
        "holdout": sum(s["holdout"] for s in sources),
        "sources": sources,
    }


def _folder(name: str, path: str, caption_column: str) -> dict[str, Any]:
    """One imagefolder's name, path, image count and ``metadata.jsonl`` sha256."""
    from sdcluster.data.reader import scan

    meta = Path(path) / "metadata.jsonl"
    rows, _ = scan(path, caption_column)
    found: dict[str, Any] = {"name": name, "path": path, "images": len(rows)}
    if meta.is_file():
        found["metadata_sha256"] = hashlib.sha256(meta.read_bytes()).hexdigest()
    return found


def _dataset_lines(data: dict[str, Any]) -> list[str]:
    """The card's Dataset section: the folder, or one line per source."""
    held = f"{data['holdout']} held out for the validation loss"
    if "sources" not in data:
        return [
            f"`{data['name']}` at `{data['path']}`: {data['images']} images ({held}), `metadata.jsonl` "
            f"sha256 `{data.get('metadata_sha256')}`."
        ]
    lines = [f"{len(data['sources'])} sources, {data['images']} images ({held}):", ""]
    for s in data["sources"]:
        commit = f" at commit `{s['commit']}`" if "commit" in s else ""
        lines.append(
            f"- `{s['name']}` at `{s['path']}`{commit}: {s['images']} images x {s['repeats']} repeats "
            f"({s['holdout']} held out), `metadata.jsonl` sha256 `{s.get('metadata_sha256')}`"
        )
    return lines


def _losses(run: RunPaths) -> dict[str, Any]:
    """Steps trained and the final and best validation loss (``metrics.jsonl``); empty without one."""
    train, val = metrics.read(run.metrics)
    found: dict[str, Any] = {}
    if train:
        found["final_train_loss"] = train[-1][1]
    if val:
        best = min(val, key=lambda pair: pair[1])
        found |= {"final_val_loss": val[-1][1], "final_val_step": val[-1][0]}
        found |= {"best_val_loss": best[1], "best_val_step": best[0]}
    return found


def _copy_grid(run: RunPaths, export: Path) -> bool:
    """Copy the newest validation grid into the export (the card links it relatively)."""
    grids = sorted(run.validation.glob("step-*/grid.png"))
    if grids:
        shutil.copyfile(grids[-1], export / GRID_FILE)
    return bool(grids)


def _settings_table(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """Rows ``| key | value |`` of the settings that define the run (nested groups flattened)."""
    rows: list[str] = []
    for key, value in sorted(settings.items()):
        if isinstance(value, dict):
            rows += _settings_table(value, f"{prefix}{key}.")
        else:
            rows.append(f"| `{prefix}{key}` | `{value}` |")
    return rows


def _metadata(cfg: Config, family: Family, adapter: bool, facts: dict[str, Any]) -> Any:
    from huggingface_hub import ModelCardData

    tags = ["diffusers", "text-to-image", "stable-diffusion", "sdcluster", *(["lora"] if adapter else [])]
    hub_base = cfg.model.path if is_hub_id(cfg.model.path) else None  # the hub links only its own ids
    return ModelCardData(
        base_model=hub_base,
        base_model_relation=("adapter" if adapter else "finetune") if hub_base else None,
        license=_base_license(cfg),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        sdcluster=facts,
    )


def _pinned(cfg: Config) -> str:
    """The base model as trained: its path or hub id, and the revision and commit when it has them."""
    pins = [
        f"{name} `{value}`"
        for name, value in (("revision", cfg.model.revision), ("commit", cfg.model.commit))
    ]
    return ", ".join([f"`{cfg.model.path}`", *[p for p in pins if "`None`" not in p]]) + "."


def _usage(cfg: Config, family: Family, adapter: bool, extra_files: list[str]) -> list[str]:
    pipeline = family.pipeline_class.__name__
    if not adapter:
        lines = [
            "```python",
            f"from diffusers import {pipeline}",
            "",
            f'pipe = {pipeline}.from_pretrained(".")',
            "```",
        ]
        for name in extra_files:  # train.export_formats=single_file
            lines += ["", f"For ComfyUI and AUTOMATIC1111/Forge, `{name}` is the whole model in one file."]
        return lines
    lines = [
        "```python",
        f"from diffusers import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("{cfg.model.path}")',
        f'pipe.load_lora_weights(".", weight_name="{LORA_WEIGHTS}")',
        "```",
    ]
    if extra_files:
        names = ", ".join(f"`{name}`" for name in extra_files)
        lines += ["", f"For ComfyUI and AUTOMATIC1111/Forge, copy {names} into their LoRA folder."]
    return lines


def _body(run: RunPaths, export: Path, cfg: Config, family: Family, facts: dict[str, Any]) -> list[str]:
    """The card's text: what the export is, its base model, data, results, use, command and settings."""
    adapter = (export / LORA_WEIGHTS).is_file()
    # beside a LoRA's own file: its kohya file; at a pipeline's top level: its single-file checkpoint
    extra = sorted(p.name for p in export.glob("*.safetensors") if p.name != LORA_WEIGHTS)
    data, losses = facts["dataset"], _losses(run)
    what = "LoRA adapters" if adapter else "a fine-tuned pipeline"
    return [
        f"# {run.root.name}",
        "",
        f"{what} for `{cfg.model.path}` ({family.name}, `train.method={cfg.train.method}`), trained by "
        f"sdcluster for {cfg.train.max_steps} steps. Run identity `{facts['identity']}`.",
        "",
        "## Base model",
        "",
        _pinned(cfg),
        "",
        "## Dataset",
        "",
        *_dataset_lines(data),
        "",
        "## Results",
        "",
        *[f"- {key.replace('_', ' ')}: {value:.6g}" for key, value in losses.items()],
        *(["", f"![validation images]({GRID_FILE})"] if _copy_grid(run, export) else []),
        "",
        "## Use",
        "",
        *_usage(cfg, family, adapter, extra),
        "",
        "## Reproduce",
        "",
        "```bash",
        launch_command(cfg),
        "```",
        "",
        "## Settings that define the run",
        "",
        "| key | value |",
        "| --- | --- |",
        *_settings_table(identity.semantic_train_config(cfg)),
    ]


def card_text(export: Path, run_root: Path, cfg: Config, family: Family) -> str:
    """The card of the export staged in ``export``, for the run in ``run_root`` with config ``cfg``."""
    from huggingface_hub import ModelCard

    run = RunPaths(run_root)
    facts = {
        "run": run_root.name,
        "identity": identity.config_hash(cfg),
        "family": family.name,
        "method": cfg.train.method,
        "steps": cfg.train.max_steps,
        "base_model": {"path": cfg.model.path, "revision": cfg.model.revision, "commit": cfg.model.commit},
        "dataset": _dataset(cfg),
        **_losses(run),
    }
    body = _body(run, export, cfg, family, facts)
    yaml = _metadata(cfg, family, (export / LORA_WEIGHTS).is_file(), facts).to_yaml()
    return redact(str(ModelCard(f"---\n{yaml}\n---\n\n" + "\n".join(body) + "\n")))


def write_card(export: Path, run_root: Path, family: Family) -> Path | None:
    """Write the model card (:data:`CARD_FILE`) into the staging folder ``export`` of the run in
    ``run_root`` (a folder that holds no run record, an export made outside a run, gets none)."""
    cfg = run_config(run_root)
    if cfg is None:
        log.info("no model card: %s holds no run config", run_root)
        return None
    dest = export / CARD_FILE
    dest.write_text(card_text(export, run_root, cfg, family), encoding="utf-8")
    return dest
