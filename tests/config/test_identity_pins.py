"""Every identity hash stays what it was: run folders, generation folders and latent-cache keys.

The literals below were computed by the code before run identity moved into :mod:`sdcluster.identity`; a
folder or cache entry made then must be found now (a changed hash would silently start a run over, make a
generation's images again, or encode the dataset again). Paths the hashes cover are fixed strings (or
relative to a test folder made the current directory), so the literals do not depend on the checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdcluster import identity, paths
from sdcluster.data import latent_cache
from sdcluster.models.family import SD1, SDXL
from sdcluster.models.text_encoders import TextEncoders
from tests.conftest import compose, copy_sample

DATA = "data.path=/datasets/sample"
COMMIT = "model.commit=" + "a" * 40
VAE = ("model.vae_path=/models/vae", "model.vae_commit=" + "b" * 40)

RUNS = {  # overrides -> (run folder name, config_hash)
    (DATA,): ("tiny-d3337f89", "d3337f8917d8b2c2"),
    (DATA, "train.method=lora"): ("tiny-f69a1d3a", "f69a1d3a1b4525df"),
    (DATA, "train.method=lora", "train.lora.rank=8"): ("tiny-46c70e1f", "46c70e1faf48b792"),
    (DATA, "train.method=lora", "train.lora.fuse_export=true"): ("tiny-f69a1d3a", "f69a1d3a1b4525df"),
    (DATA, "model=sd15"): ("sd15-8cc9889a", "8cc9889ad186065c"),
    (DATA, "model=sd15", COMMIT): ("sd15-a6673976", "a667397655517aa4"),
    (DATA, "model=sd15", COMMIT, "train.method=lora"): ("sd15-10ed4101", "10ed4101e1b14f16"),
    (DATA, "model=sdxl", "train.resolution=1024"): ("sdxl-9fac8686", "9fac868685f873c4"),
    (DATA, "model=sdxl", COMMIT, *VAE, "train.resolution=1024"): ("sdxl-8fc5f7db", "8fc5f7dbfcb2bd3c"),
    (DATA, "model=tiny_sdxl"): ("tiny_sdxl-a23d33d7", "a23d33d73eb9591c"),
    (DATA, *VAE): ("tiny-22b9f835", "22b9f835dff14c76"),
    (DATA, "data.holdout=1", "data.cache=false"): ("tiny-75649d21", "75649d21f489ca17"),
    (DATA, "train.center_crop=true", "train.random_flip=false"): ("tiny-1dc25f4f", "1dc25f4fe63c5abf"),
    (DATA, "optim.lr_schedule=cosine", "train.max_steps=50"): ("tiny-3678d9e5", "3678d9e5e41838f0"),
    ("experiment=jeans_sd14", "data=imagefolder", "data.path=/tmp"): ("sd14-04a055da", "04a055da33415488"),
}


@pytest.mark.parametrize("overrides", list(RUNS))
def test_run_folders_and_checkpoint_hashes_keep_their_values(overrides):
    cfg = compose(list(overrides))
    assert (paths.run_dir(cfg).name, identity.config_hash(cfg)) == RUNS[overrides]


LORA = "generate.lora=/loras/l.safetensors"
GENERATIONS = {  # overrides -> generation folder relative to output_root
    (DATA,): "runs/tiny-d3337f89/generated/cd575b5a",
    (DATA, "generate.steps=3", "generate.num_images=2"): "runs/tiny-d3337f89/generated/05d8885f",
    (DATA, "generate.batch_size=3", "generate.shards=2"): "runs/tiny-d3337f89/generated/cd575b5a",
    (DATA, "train.method=lora"): "runs/tiny-f69a1d3a/generated/52181bef",
    (DATA, "train.method=lora", "generate.lora_scale=0.5"): "runs/tiny-f69a1d3a/generated/8016a1eb",
    (DATA, "generate.model=/models/m"): "generate/dcf35898",
    (DATA, "generate.model=/models/m", LORA, "generate.lora_scale=0.7"): "generate/ca0c9266",
    (DATA, LORA): "runs/tiny-d3337f89/generated/0944a9ca",
    (DATA, "model=sd15", COMMIT, "train.max_steps=40"): "runs/sd15-a6673976/generated/f6f93b4e",
    (DATA, "model=sdxl", COMMIT, *VAE, "train.resolution=1024", "generate.guidance_scale=5.0"): (
        "runs/sdxl-8fc5f7db/generated/b83421fc"
    ),
    (DATA, "generate.seed=3", "generate.scheduler=ddim"): "runs/tiny-d3337f89/generated/f95e8300",
}


def _generation(overrides: tuple[str, ...], prompts: str | None) -> str:
    # generate.lora must name an existing file when composed: set after, like the relative prompts file
    lora = [o.partition("=")[2] for o in overrides if o.startswith("generate.lora=")]
    # a fixed output_root: a run's export and adapters are named in the hash by their absolute paths
    cfg = compose(["output_root=/outputs", *(o for o in overrides if not o.startswith("generate.lora="))])
    cfg.generate.lora = lora[0] if lora else None
    if prompts is not None:  # relative on purpose: absolutize would put the test's tmp folder in the hash
        cfg.generate.prompts_file = prompts
    return paths.generation_dir(cfg).relative_to(cfg.output_root).as_posix()


@pytest.mark.parametrize("overrides", list(GENERATIONS))
def test_generation_folders_keep_their_names(overrides):
    assert _generation(overrides, None) == GENERATIONS[overrides]


def test_a_prompts_file_names_the_generation_folder_by_its_contents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a pair of jeans\nfaded denim\n")
    assert _generation((DATA,), "prompts.txt") == PROMPTS_FILE
    Path("prompts.txt").write_text("a pair of jeans\n")
    assert _generation((DATA,), "prompts.txt") != PROMPTS_FILE


PROMPTS_FILE = "runs/tiny-d3337f89/generated/c0fafb1e"

CACHE_KEYS = {  # (family, model source, vae_path, overrides) -> latent-cache key
    ("sd1", "model", None, ()): "109cb94130a7ca593257eebb",
    ("sd1", "model", "vae", ()): "8fbad45ac7e5d7d802885226",
    ("sdxl", "model", None, ()): "b33a5e31957891b9eea808c0",
    (
        "sdxl",
        "model",
        "vae",
        ("train.center_crop=true", "train.random_flip=false"),
    ): "e64a7d89894fdf60b6b5ecd9",
    ("sd1", "owner/name", None, ("model.revision=v1", "model.variant=fp16")): "f2c9de14b1654122bdd6f56e",
    ("sd1", "model", None, ("train.resolution=32",)): "e3e924772713a983872532ad",
}


def _fixed_files(folder: Path, names: tuple[str, ...]) -> None:
    """Files of fixed size and mtime: the cache key covers both, so the literals stay reproducible."""
    for n, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (10 + n))
        os.utime(path, ns=(1_700_000_000_000_000_000 + n, 1_700_000_000_000_000_000 + n))


@pytest.mark.parametrize("case", list(CACHE_KEYS))
def test_latent_cache_keys_keep_their_values(case, tmp_path, monkeypatch):
    family_name, source, vae_path, overrides = case
    family = {"sd1": SD1, "sdxl": SDXL}[family_name]()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # empty: a hub id's files are unknown
    parts = ("vae", *family.tokenizer_classes, *family.text_encoder_classes)
    _fixed_files(tmp_path / "model", tuple(f"{p}/config.json" for p in (*parts, "unet")))
    _fixed_files(tmp_path / "vae", ("config.json", "diffusion_pytorch_model.safetensors"))
    data = copy_sample(tmp_path / "data", 2)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    cfg = compose([f"data.path={data}", *overrides])
    cfg.model.vae_path = vae_path  # relative, as above
    names = family.text_encoder_classes
    encoders = TextEncoders(dict.fromkeys(names), dict.fromkeys(names, torch.float32))  # dtypes: no load
    comps = SimpleNamespace(
        family=family, source=source, vae=SimpleNamespace(dtype="torch.float32"), text_encoders=encoders
    )
    dataset = {"file_name": [r["file_name"] for r in rows], "text": [r["text"] for r in rows]}
    assert latent_cache.make_plan(cfg, dataset, comps).key == CACHE_KEYS[case]
