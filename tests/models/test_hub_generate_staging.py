"""What generation loads from the hub is staged before the queue like the base model: ``generate.model``,
``generate.lora`` and the CLIP scorer (``generate.scores.clip_model``) as hub ids are resolved to commits,
pinned, checked (safetensors only) and downloaded once; the job reads the staged files with the hub off.

The hub is :mod:`tests.hub_server` on loopback (the ``hub`` fixture of ``test_hub_staging``), serving the tiny
model, a LoRA made for it and the tiny CLIP, each beside files that must never be fetched.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sdcluster import paths
from sdcluster.config import ConfigError
from sdcluster.models.hub import stage_for_launch
from tests.hub_server import Repo, folder_files
from tests.models.test_hub_staging import COMMIT, NEWER, REPO_ID, hub  # noqa: F401 (the fixture)

LORA_ID = "test-org/tiny-lora"
CLIP_ID = "test-org/tiny-clip"
PROMPT = "dark blue jeans laid flat on a white background"
QUICK = [
    "task=generate",
    f"generate.prompts=[{PROMPT}]",
    "generate.num_images=2",
    "generate.batch_size=2",
    "generate.steps=2",
    "generate.height=64",
    "generate.width=64",
]


@pytest.fixture(scope="module")
def lora_file(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.generate.test_lora_generation import write_lora

    return write_lora(tiny_model, tmp_path_factory.mktemp("lora"))


@pytest.fixture
def gen_hub(hub, lora_file: Path, cache_root: Path):  # noqa: F811 (the imported fixture)
    """The loopback hub, also serving a LoRA repo and a CLIP repo (with pickled twins never to be fetched)."""
    from sdcluster.models.tiny_clip import ensure_tiny_clip

    lora = {
        lora_file.name: lora_file.read_bytes(),
        "pytorch_lora_weights.bin": b"a pickle",
        "README.md": b"#",
    }
    clip = folder_files(ensure_tiny_clip(cache_root)) | {
        "pytorch_model.bin": b"a pickle",
        "tf_model.h5": b"x",
    }
    hub.repos[LORA_ID] = Repo(files=lora, commit=NEWER, refs={"main": NEWER})
    hub.repos[CLIP_ID] = Repo(files=clip, commit=COMMIT, refs={"main": COMMIT})
    return hub


def _cfg(make_cfg, tmp_path: Path, *extra: str):
    return make_cfg(
        [
            *QUICK,
            f"model.cache_dir={tmp_path / 'hf'}",
            f"generate.model={REPO_ID}",
            f"generate.lora={LORA_ID}",
            "generate.scores.clip=true",
            f"generate.scores.clip_model={CLIP_ID}",
            *extra,
        ]
    )


def _fetched(server, repo_id: str) -> set[str]:
    """The files of ``repo_id`` whose bytes the hub sent."""
    prefix = f"/{repo_id}/resolve/"
    sent = [p for m, p, _ in server.requests if m == "GET" and p.startswith(prefix)]
    return {p[len(prefix) :].split("/", 1)[1] for p in sent}


def test_a_dry_run_pins_all_three_and_downloads_no_weight(gen_hub, make_cfg, tmp_path):
    cfg = _cfg(make_cfg, tmp_path)
    said: list[str] = []
    pinned, staged = stage_for_launch(cfg, dry_run=True, say=said.append)
    assert staged is None, "the run's own model (tiny) is not a hub model"
    gen = pinned.generate
    assert (gen.model_commit, gen.lora_commit, gen.scores.clip_commit) == (COMMIT, NEWER, COMMIT)
    assert gen.model == REPO_ID and gen.lora == LORA_ID, "the ids stay as typed; the commits pin them"
    assert gen.scores.clip_model == CLIP_ID, "a dry run downloads no snapshot to point the scorer at"
    assert cfg.generate.model_commit is None, "the caller's config is left as typed"
    for key, repo in (
        ("generate.model", REPO_ID),
        ("generate.lora", LORA_ID),
        ("generate.scores.clip_model", CLIP_ID),
    ):
        assert any(line.startswith(f"{key}: {repo} main -> commit") for line in said), said
    assert _fetched(gen_hub, REPO_ID) == {"model_index.json"} and not _fetched(gen_hub, LORA_ID)
    assert not _fetched(gen_hub, CLIP_ID)
    assert not (tmp_path / "hf" / "models--test-org--tiny-clip" / "snapshots").exists()

    # the images' folder is named by the commits: main at C and an explicit pin to C are one folder
    explicit = _cfg(make_cfg, tmp_path, f"generate.model_commit={COMMIT}", f"generate.lora_commit={NEWER}")
    assert paths.generation_dir(pinned) == paths.generation_dir(explicit)
    assert paths.generation_dir(pinned).parent == tmp_path / "outputs" / "generate"
    other = _cfg(make_cfg, tmp_path, "generate.model_commit=" + "3" * 40, f"generate.lora_commit={NEWER}")
    assert paths.generation_dir(other) != paths.generation_dir(pinned)


def test_staging_downloads_only_the_safetensors_each_loads_once(gen_hub, make_cfg, tmp_path):
    pinned, _ = stage_for_launch(_cfg(make_cfg, tmp_path), say=lambda _: None)
    assert _fetched(gen_hub, LORA_ID) == {"pytorch_lora_weights.safetensors"}
    clip = _fetched(gen_hub, CLIP_ID)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= clip
    assert not clip & {"pytorch_model.bin", "tf_model.h5"}
    model = _fetched(gen_hub, REPO_ID)
    assert "unet/diffusion_pytorch_model.safetensors" in model and not any(f.endswith(".bin") for f in model)
    snapshot = tmp_path / "hf" / "models--test-org--tiny-clip" / "snapshots" / COMMIT
    assert pinned.generate.scores.clip_model == str(snapshot), "the scorer reads the pinned snapshot"
    assert (snapshot / "model.safetensors").is_file()
    before = len(gen_hub.requests)
    stage_for_launch(pinned, say=lambda _: None)  # pinned and complete: no file is sent again
    assert not [r for r in gen_hub.requests[before:] if r[0] == "GET" and "/resolve/" in r[1]]


def test_each_generation_repo_refusal_names_its_key_and_the_fix(gen_hub, make_cfg, tmp_path):
    gen_hub.repos["test-org/two-loras"] = Repo(files={"a.safetensors": b"a", "b.safetensors": b"b"})
    gen_hub.repos["test-org/pickled-clip"] = Repo(files={"config.json": b"{}", "pytorch_model.bin": b"x"})
    cases = {
        "generate.model=test-org/no-such-model": r"^generate\.model: 'test-org/no-such-model' is not a model",
        "generate.lora=test-org/two-loras": r"^generate\.lora: .* 2 \.safetensors files .*Fix: download",
        "generate.scores.clip_model=test-org/pickled-clip": (
            r"^generate\.scores\.clip_model: .* no model\.safetensors .*Fix: pick a CLIP repo"
        ),
        f"generate.lora_commit={'4' * 40}": r"^generate\.lora_commit: '4{40}' is not a branch, tag or commit",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            stage_for_launch(_cfg(make_cfg, tmp_path, override), dry_run=True, say=lambda _: None)
    with pytest.raises(ConfigError, match=r"^generate\.model_commit: pins a hub repo, but"):
        make_cfg(["generate.model=/models/m", f"generate.model_commit={COMMIT}"])
    gen_hub.close()  # no hub, and a cache that never saw the model
    with pytest.raises(
        ConfigError, match=r"^generate\.model: the hub cannot be reached.*Fix: .*launch again there"
    ):
        stage_for_launch(_cfg(make_cfg, tmp_path), dry_run=True, say=lambda _: None)


@pytest.mark.slow
def test_a_generation_job_reads_the_staged_model_lora_and_clip_with_the_hub_off(
    gen_hub, make_cfg, tmp_path, monkeypatch, tiny_model, lora_file
):
    """A real local generation job from ``generate.model=owner/name`` with a hub LoRA and the CLIP scorer:
    its images are those of the same model, LoRA and scorer read from local folders, bit for bit, and no
    process of the job asks the hub although it can reach it (only the job's own switch keeps it off)."""
    from huggingface_hub import constants

    from sdcluster.cluster.submit_and_wait import launch
    from sdcluster.generate import records
    from sdcluster.generate.job import generate_images

    monkeypatch.setenv("HF_ENDPOINT", gen_hub.url)  # the local job's process reaches the live hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the job must switch the hub off by itself
    cfg = _cfg(make_cfg, tmp_path)
    stage_for_launch(cfg, say=lambda _: None)  # staged ahead, as a login node with the hub does
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the launch: from the cache from here on
    asked = len(gen_hub.requests)
    said: list[str] = []
    assert launch(cfg, say=said.append) == 0, "\n".join(said)
    assert gen_hub.requests[asked:] == [], "a process of the job asked the hub"

    (job,) = [p.parent for p in (tmp_path / "jobs").glob("*/job.json")]
    assert json.loads((job / "job.json").read_text())["state"] == "COMPLETED"
    written = yaml.safe_load((job / "config.yaml").read_text())["generate"]
    assert (written["model_commit"], written["lora_commit"], written["scores"]["clip_commit"]) == (
        COMMIT,
        NEWER,
        COMMIT,
    )
    pinned = dataclasses.replace(
        cfg, generate=dataclasses.replace(cfg.generate, model_commit=COMMIT, lora_commit=NEWER)
    )
    made = records.read_image_manifest(paths.generation_dir(pinned))
    assert len(made) == 2 and all(-1 <= r["scores"]["clip"] <= 1 for r in made)

    local = make_cfg([*QUICK, f"generate.model={tiny_model}", f"generate.lora={lora_file}"])
    local.generate.scores.clip, local.generate.scores.clip_model = True, "tiny"
    local.output_root = str(tmp_path / "local")
    expected = records.read_image_manifest(generate_images(local).out_dir)
    for hub_record, local_record in zip(made, expected, strict=True):
        assert hub_record["scores"]["clip"] == local_record["scores"]["clip"]
        images = [
            np.asarray(Image.open(folder / r["file"]).convert("RGB"))
            for folder, r in (
                (paths.generation_dir(pinned), hub_record),
                (paths.generation_dir(local), local_record),
            )
        ]
        assert np.array_equal(*images), "the job did not read the staged model and LoRA"
