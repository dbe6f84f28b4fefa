"""Every export carries a model card (``CARD_FILE``) that huggingface_hub parses, made from the run's records.

One real run (tiny LoRA, fused too, kohya file, validation grid, held-out loss) checks what a run writes;
a run folder written by hand checks what only a hub model has (``base_model``, the license of its card in
the hub cache) and that no token gets into the card; the reproduce command is composed again.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from sdcluster.atomic import read_jsonl
from sdcluster.config.generate import LORA_WEIGHTS
from sdcluster.identity import config_hash
from sdcluster.models.family import SD1
from sdcluster.paths import RunPaths
from sdcluster.redaction import config_yaml
from sdcluster.train.loop import train
from sdcluster.train.model_card import CARD_FILE, GRID_FILE, write_card
from sdcluster.train.rerun import launch_command
from tests.conftest import copy_sample

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_" + "Ab3" * 12  # the shape of a hub token


def _arguments(command: str) -> list[str]:
    """The overrides of a ``sdcluster launch`` command as the shell hands them over."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["sdcluster", "launch"]
    return words[2:]


@pytest.mark.slow
def test_a_lora_run_writes_a_card_with_each_export(make_cfg):
    cfg = make_cfg(
        [
            "train.method=lora",
            "train.max_steps=2",
            "train.validate_every=1",
            "train.checkpoint_every=100",
            "train.validation_steps=2",
            "train.lora.alpha=8",
            "train.lora.fuse_export=true",
            "train.export_formats=[diffusers,kohya]",
        ]
    )
    result = train(cfg)
    run = RunPaths(result.run_dir)
    val = [r["val_loss"] for r in read_jsonl(run.metrics) if "val_loss" in r]
    assert len(val) == 2  # steps 1 and 2: a final and a best loss to report

    lora = ModelCard.load(run.lora / CARD_FILE)
    facts = lora.data.sdcluster
    assert facts["run"] == run.root.name and facts["identity"] == config_hash(cfg)
    assert (facts["family"], facts["method"], facts["steps"]) == ("sd1", "lora", 2)
    assert facts["final_val_loss"] == val[-1] and facts["best_val_loss"] == min(val)
    assert facts["dataset"]["images"] == len(list(read_jsonl(Path(cfg.data.path) / "metadata.jsonl")))
    assert facts["dataset"]["holdout"] == cfg.data.holdout > 0
    assert "lora" in lora.data.tags and lora.data.library_name == "diffusers"
    assert f"{run.root.name}_kohya.safetensors" in lora.text  # the file for ComfyUI/A1111 is named
    grids = sorted(run.validation.glob("step-*/grid.png"))
    assert (run.lora / GRID_FILE).read_bytes() == grids[-1].read_bytes()
    assert f"]({GRID_FILE})" in lora.text

    fused = ModelCard.load(run.model / CARD_FILE)  # the pipeline with the LoRA fused: a card of its own
    assert fused.data.sdcluster["identity"] == facts["identity"] and "lora" not in fused.data.tags
    assert 'from_pretrained(".")' in fused.text


def _run_folder(
    make_cfg, tmp_path: Path, overrides: list[str], data: list[str] | None = None
) -> tuple[RunPaths, Path]:
    """A LoRA run's folder as training leaves it (config, metrics, a validation grid) and its export;
    ``data``: the data overrides (default: 4 sample images, 1 held out)."""
    if data is None:
        data = [f"data.path={copy_sample(tmp_path / 'data', count=4)}", "data.holdout=1"]
    cfg = make_cfg(["train.method=lora", *data, *overrides])
    run = RunPaths(Path(cfg.output_root) / "runs" / "sd15-lora")
    (run.validation / "step-00000040").mkdir(parents=True)
    (run.validation / "step-00000040" / "grid.png").write_bytes(b"png")
    run.config.write_text(config_yaml(cfg))
    losses = [(10, 0.5), (20, 0.2), (40, 0.3)]
    run.metrics.write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in losses))
    export = run.root / "staging"
    export.mkdir()
    (export / LORA_WEIGHTS).write_bytes(b"")  # a LoRA export (the card reads no weights)
    return run, export


def test_a_lora_card_names_the_hub_base_model_its_commit_and_license(make_cfg, tmp_path):
    hub = tmp_path / "hub"  # the hub cache as huggingface_hub lays it out, holding the base model's card
    snapshot = hub / "models--someorg--sd15" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / CARD_FILE).write_text("---\nlicense: creativeml-openrail-m\n---\n# sd15\n")
    model = ["model.name=sd15", "model.path=someorg/sd15", f"model.commit={COMMIT}", f"model.cache_dir={hub}"]
    run, export = _run_folder(make_cfg, tmp_path, model)

    card = ModelCard.load(write_card(export, run.root, SD1()))
    assert card.data.base_model == "someorg/sd15" and card.data.base_model_relation == "adapter"
    assert card.data.license == "creativeml-openrail-m"
    facts = card.data.sdcluster
    assert facts["base_model"]["commit"] == COMMIT and COMMIT in card.text
    assert (facts["final_val_loss"], facts["best_val_loss"], facts["best_val_step"]) == (0.3, 0.2, 20)
    assert facts["dataset"]["images"] == 4 and len(facts["dataset"]["metadata_sha256"]) == 64
    assert (export / GRID_FILE).read_bytes() == b"png"
    assert "| `train.lora.rank` | `4` |" in card.text  # the settings that define the run


def test_a_card_of_a_run_on_several_sources_names_each(make_cfg, tmp_path, monkeypatch):
    product = copy_sample(tmp_path / "product", 3)
    reg = copy_sample(tmp_path / "reg", 5, lambda r: {"file_name": r["file_name"], "caption": r["text"]})
    sources = f"data.sources=[{{name: product, path: {product}, repeats: 2, holdout: 1}}, "
    sources += f"{{name: reg, path: {reg}, caption_column: caption}}]"
    run, export = _run_folder(make_cfg, tmp_path, [], data=["data=sources", sources, "data.holdout=0"])
    monkeypatch.chdir(copy_sample(tmp_path / "elsewhere", 2))  # a folder the card must not describe

    card = ModelCard.load(write_card(export, run.root, SD1()))
    data = card.data.sdcluster["dataset"]
    assert [(s["name"], s["path"], s["images"]) for s in data["sources"]] == [
        ("product", str(product), 3),
        ("reg", str(reg), 5),
    ]
    assert [(s["repeats"], s["holdout"]) for s in data["sources"]] == [(2, 1), (1, 0)]
    assert (data["images"], data["holdout"]) == (8, 1) and len(data["sources"][1]["metadata_sha256"]) == 64
    assert f"- `product` at `{product}`: 3 images x 2 repeats (1 held out)" in card.text


def test_no_token_reaches_the_card(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run, export = _run_folder(make_cfg, tmp_path, [])
    # a config record written before tokens were masked (a prompt that carried one)
    run.config.write_text(run.config.read_text().replace("A single pair", f"A single {TOKEN} pair"))
    text = write_card(export, run.root, SD1()).read_text()
    assert TOKEN not in text and "hf_Ab3" not in text
    assert "A single *** pair" in text  # masked where it was, the rest of the card intact


def test_the_reproduce_command_composes_the_same_run(make_cfg, tmp_path):
    prompts = 'train.validation_prompts=[\'a photo, of "x"\', "it\'s 1"]'
    cfg = make_cfg(["train.method=lora", "data.holdout=0", "run_name=my run", "optim.lr=3e-5", prompts])
    again = make_cfg(_arguments(launch_command(cfg)))
    assert config_hash(again) == config_hash(cfg) and again.run_name == "my run"
    assert again.train.validation_prompts == cfg.train.validation_prompts
    assert again.data.holdout == 0  # the sample data's group sets 2: the identity keys are always given


def test_an_export_outside_a_run_folder_gets_no_card(tmp_path):
    export = tmp_path / "lora"
    export.mkdir()
    assert write_card(export, tmp_path, SD1()) is None and not (export / CARD_FILE).exists()


def test_a_base_model_card_that_does_not_parse_leaves_the_license_out(make_cfg, tmp_path):
    base = tmp_path / "base"  # a local base model folder whose own card has broken metadata
    base.mkdir()
    (base / CARD_FILE).write_text("---\nlicense: [unclosed\n---\n")
    run, export = _run_folder(make_cfg, tmp_path, [f"model.path={base}", "model.native_resolution=null"])
    card = ModelCard.load(write_card(export, run.root, SD1()))
    assert card.data.license is None and card.data.base_model is None  # a local path is no hub link
    assert f"`{base}`" in card.text
