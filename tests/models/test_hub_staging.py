"""Hub models are staged on the login node: resolved to a commit, checked, downloaded once (only what the
pipeline loads), then read by jobs from the cache with the hub switched off.

The hub is :mod:`tests.hub_server` on loopback, holding the tiny model plus the files a real SD repo also
carries (pickled twins, a checkpoint, fp16 and EMA variants, a safety checker) that must never be fetched.
In-process tests point huggingface_hub's endpoint constants at it; the CLI test uses ``HF_ENDPOINT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster.config import ConfigError
from sdcluster.models.hub import select_files, stage, stage_for_launch, staged_folder
from tests.hub_server import HubServer, Repo, folder_files

REPO_ID = "test-org/tiny-sd"
SDXL_ID = "test-org/tiny-sdxl"
VAE_ID = "test-org/tiny-vae-fp16-fix"
GATED_ID = "test-org/gated-sd"
COMMIT = "1111111111111111111111111111111111111111"
NEWER = "2222222222222222222222222222222222222222"
TOKEN = "hf_StagingTestTokenNeverWrittenAnywhere42"
NEVER_FETCHED = {
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "sd-v1-4.ckpt",
}


def _repo_files(tiny_model: Path) -> dict[str, bytes]:
    """The tiny pipeline as a hub repo, plus what real SD repos also hold and sdcluster must not fetch."""
    files = {p: b for p, b in folder_files(tiny_model).items() if "/" in p or p == "model_index.json"}
    index = json.loads(files["model_index.json"])
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    files["model_index.json"] = json.dumps(index).encode()
    for name in NEVER_FETCHED:
        twin = {
            "unet": "unet/diffusion_pytorch_model.safetensors",
            "vae": "vae/diffusion_pytorch_model.safetensors",
        }
        files[name] = files.get(twin.get(name.split("/")[0], ""), b"not loaded")
    return files


@pytest.fixture
def hub(tiny_model: Path, cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The loopback hub, with huggingface_hub (in this process) pointed at it, online, and no token."""
    from huggingface_hub import constants

    from sdcluster.models.embedded import ensure_tiny_model

    files = _repo_files(tiny_model)
    sdxl = {p: b for p, b in folder_files(ensure_tiny_model(cache_root, "tiny_sdxl")).items() if "/" in p}
    sdxl["model_index.json"] = (ensure_tiny_model(cache_root, "tiny_sdxl") / "model_index.json").read_bytes()
    sdxl["vae_1_0/diffusion_pytorch_model.safetensors"] = b"an older VAE the pipeline does not load"
    vae = {p.split("/", 1)[1]: b for p, b in sdxl.items() if p.startswith("vae/")}
    vae |= {
        "sdxl_vae.safetensors": b"a single-file copy for other tools",
        "diffusion_pytorch_model.bin": b"x",
    }
    repos = {
        SDXL_ID: Repo(files=sdxl, commit=NEWER, refs={"main": NEWER}),
        VAE_ID: Repo(files=vae, commit=COMMIT, refs={"main": COMMIT}),
        REPO_ID: Repo(files=files, commit=COMMIT, refs={"main": COMMIT, "v1": COMMIT}),
        GATED_ID: Repo(
            files=files, commit=COMMIT, refs={"main": COMMIT}, gated=True, accepted_tokens={TOKEN}
        ),
    }
    with HubServer(repos) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        # hf_hub_download builds file URLs from this template, computed once at import from HF_ENDPOINT
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest switches the hub off for the suite
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored login
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def _cfg(make_cfg, tmp_path: Path, *extra: str):
    return make_cfg(
        [f"model.path={REPO_ID}", "model.name=tiny-hub", f"model.cache_dir={tmp_path / 'hf'}", *extra]
    )


def test_staging_fetches_only_what_the_pipeline_loads_once_and_pins_the_commit(hub, make_cfg, tmp_path):
    cfg = _cfg(make_cfg, tmp_path)
    said: list[str] = []
    cfg, staged = stage_for_launch(cfg, say=said.append)
    assert staged is not None and cfg.model.commit == COMMIT == staged.commit
    expected = {"model_index.json"} | {
        p
        for p in hub.repos[REPO_ID].files
        if p.split("/")[0] in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    } - NEVER_FETCHED
    assert hub.downloaded() == expected
    assert staged.folder == tmp_path / "hf" / "models--test-org--tiny-sd" / "snapshots" / COMMIT
    assert all((staged.folder / f).is_file() for f in expected)
    assert not any((staged.folder / f).exists() for f in NEVER_FETCHED)
    assert any(COMMIT in line and str(staged.folder) in line for line in said)

    fetched = [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    again = stage(cfg.model)  # pinned now: nothing is downloaded a second time
    assert again.folder == staged.folder and again.missing_bytes == 0
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]] == fetched


def test_the_fp16_variant_selects_its_own_weights_and_a_missing_one_is_refused():
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "U"],
        "vae": ["diffusers", "V"],
        "tokenizer": ["transformers", "T"],
        "safety_checker": ["stable_diffusion", "S"],
    }
    repo = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
        "vae/diffusion_pytorch_model.bin.index.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "safety_checker/model.fp16.safetensors",
    ]
    assert select_files(index, repo, "fp16", "r") == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
    ]
    with pytest.raises(ConfigError, match=r"no bf16 safetensors weights for unet.*Fix: drop model.variant"):
        select_files(index, repo, "bf16", "r")


def test_the_family_says_which_parts_need_safetensors():
    """SDXL's second text encoder is weighted too: a repo with only pickles there is refused (a fixed list
    of SD 1.x parts let it through); a pipeline of another family is refused by name."""
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        **{part: ["diffusers", "X"] for part in ("unet", "vae", "text_encoder", "text_encoder_2")},
    }
    repo = ["model_index.json", *(f"{p}/model.safetensors" for p in ("unet", "vae", "text_encoder"))]
    with pytest.raises(ConfigError, match="no safetensors weights for text_encoder_2"):
        select_files(index, repo, None, "r")
    assert "text_encoder_2/model.safetensors" in select_files(
        index, [*repo, "text_encoder_2/model.safetensors"], None, "r"
    )
    with pytest.raises(ConfigError, match="PixArtAlphaPipeline pipeline"):
        select_files({"_class_name": "PixArtAlphaPipeline"}, repo, None, "r")


def test_the_run_follows_the_commit_not_the_branch_name(hub, make_cfg, tmp_path):
    from sdcluster import identity, paths

    first = _cfg(make_cfg, tmp_path)
    first, _ = stage_for_launch(first, dry_run=True, say=lambda _: None)
    assert hub.downloaded() == {"model_index.json"}, (
        "a dry run reads the index (to size the files), no weight"
    )
    pinned = _cfg(make_cfg, tmp_path, f"model.commit={COMMIT}", f"model.cache_dir={tmp_path / 'elsewhere'}")
    assert paths.run_dir(first) == paths.run_dir(pinned), (
        "main at C and commit C are one run, wherever cached"
    )
    hub.repos[REPO_ID].commit, hub.repos[REPO_ID].refs["main"] = NEWER, NEWER  # main moves on
    moved = _cfg(make_cfg, tmp_path)
    moved, _ = stage_for_launch(moved, dry_run=True, say=lambda _: None)
    assert moved.model.commit == NEWER and paths.run_dir(moved) != paths.run_dir(first)
    tiny = identity.model_identity(make_cfg([]).model)
    assert tiny == {"name": "tiny", "path": "tiny", "revision": None, "variant": None}
    assert stage_for_launch(make_cfg([]))[1] is None, "the tiny model never touches the hub"


def test_a_pinned_commit_is_what_is_staged_and_loaded_after_main_moves_on(hub, make_cfg, tmp_path):
    """A resumed or resubmitted run keeps its weights: ``model.commit`` wins over where ``main`` is now."""
    weights = "unet/diffusion_pytorch_model.safetensors"
    pinned_bytes = hub.repos[REPO_ID].files[weights]
    later = {**hub.repos[REPO_ID].files, weights: b"the weights of a later commit"}
    hub.repos[REPO_ID].push(later, NEWER)  # main moves on; COMMIT stays on the hub by its id
    cfg = _cfg(make_cfg, tmp_path, f"model.commit={COMMIT}")
    cfg, staged = stage_for_launch(cfg, say=lambda _: None)
    assert staged is not None and staged.commit == cfg.model.commit == COMMIT
    assert staged.folder.name == COMMIT and (staged.folder / weights).read_bytes() == pinned_bytes
    assert not (staged.folder.parent / NEWER).exists(), "nothing of main's new commit is fetched"

    _, unpinned = stage_for_launch(_cfg(make_cfg, tmp_path), say=lambda _: None)  # same cache, both now
    assert unpinned is not None and unpinned.commit == NEWER
    assert (unpinned.folder / weights).read_bytes() == later[weights]
    assert staged_folder(cfg.model) == staged.folder, "ranks load the pinned snapshot, not main's"


@pytest.mark.parametrize(
    ("overrides", "token", "expected"),
    [
        (
            ["model.path=test-org/no-such-model"],
            None,
            r"'test-org/no-such-model' is not a model on the hub.*Fix: check the id",
        ),
        (
            [f"model.path={GATED_ID}"],
            None,
            r"is gated and no token was sent.*Fix: accept its license.*HF_TOKEN",
        ),
        (
            [f"model.path={GATED_ID}"],
            "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1",
            r"has no access yet.*Fix: accept the license",
        ),
        (
            ["model.revision=no-such-branch"],
            None,
            r"model.revision: 'no-such-branch' is not a branch, tag or commit.*Fix:",
        ),
    ],
    ids=["unknown-repo", "gated-no-token", "gated-no-license", "unknown-revision"],
)
def test_each_hub_refusal_names_cause_and_fix(
    hub, make_cfg, tmp_path, monkeypatch, overrides, token, expected
):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    cfg = _cfg(make_cfg, tmp_path, *overrides)
    with pytest.raises(ConfigError, match=expected):
        stage_for_launch(cfg, say=lambda _: None)
    assert cfg.model.commit is None and not hub.downloaded()


def test_a_gated_model_stages_with_an_accepted_token(hub, make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _, staged = stage_for_launch(_cfg(make_cfg, tmp_path, f"model.path={GATED_ID}"), say=lambda _: None)
    assert staged is not None and staged.commit == COMMIT
    assert all(sent for m, p, sent in hub.requests if GATED_ID in p), "every request carried the token"


def test_too_little_space_is_refused_before_any_weight_is_downloaded(hub, make_cfg, tmp_path):
    hub.repos[REPO_ID].claimed_sizes["unet/diffusion_pytorch_model.safetensors"] = 2**60  # an exabyte
    with pytest.raises(
        ConfigError, match=r"model.cache_dir: .* GiB free, but .* needs .* GiB more.*Fix: free space"
    ):
        stage_for_launch(_cfg(make_cfg, tmp_path), say=lambda _: None)
    assert hub.downloaded() <= {"model_index.json"}


def test_without_the_hub_a_cached_model_is_fine_and_an_uncached_one_is_refused(hub, make_cfg, tmp_path):
    staged = stage(_cfg(make_cfg, tmp_path, "model.revision=v1").model)
    hub.close()  # the hub goes away: connections are refused from here on
    _, offline = stage_for_launch(_cfg(make_cfg, tmp_path, "model.revision=v1"), say=lambda _: None)
    assert (
        offline is not None
        and offline.offline
        and offline.commit == COMMIT
        and offline.folder == staged.folder
    )
    with pytest.raises(
        ConfigError,
        match=r"the hub cannot be reached .* not complete in the model cache.*"
        r"Fix: stage it .*python -m sdcluster.models fetch",
    ):
        stage_for_launch(
            _cfg(make_cfg, tmp_path, f"model.cache_dir={tmp_path / 'empty'}"), say=lambda _: None
        )
    with pytest.raises(ConfigError, match="not complete in the model cache"):  # a branch never staged
        stage_for_launch(_cfg(make_cfg, tmp_path, "model.revision=main"), say=lambda _: None)


def test_ranks_load_the_pinned_snapshot_with_the_hub_off(hub, make_cfg, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sdcluster.models.load import load_components

    cfg = _cfg(make_cfg, tmp_path)
    cfg, staged = stage_for_launch(cfg, say=lambda _: None)
    hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets in a job
    comps = load_components(cfg.model, cfg.cache_root)
    assert comps.source == str(staged.folder)
    assert comps.origin == {"path": REPO_ID, "revision": None, "commit": COMMIT, "variant": None}
    assert comps.denoiser.config.sample_size > 0
    assert comps.tokenizers["tokenizer"]("a pair of jeans").input_ids


def test_an_sdxl_repo_stages_both_text_encoders_and_loads_as_sdxl_with_the_hub_off(
    hub, make_cfg, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    from sdcluster.models.load import load_components

    cfg = make_cfg([f"model.path={SDXL_ID}", "model.name=sdxl", f"model.cache_dir={tmp_path / 'hf'}"])
    cfg, staged = stage_for_launch(cfg, say=lambda _: None)
    assert cfg.model.commit == NEWER
    fetched = {p.relative_to(staged.folder).as_posix() for p in staged.folder.rglob("*") if p.is_file()}
    for part in ("text_encoder_2/model.safetensors", "tokenizer_2/tokenizer.json", "unet/config.json"):
        assert part in fetched
    assert not any(p.startswith("vae_1_0/") for p in fetched)
    hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    comps = load_components(cfg.model, cfg.cache_root)
    assert comps.family.name == "sdxl" and comps.text_encoders["text_encoder_2"].config.projection_dim > 0


def test_a_hub_vae_is_staged_pinned_and_loaded_with_the_hub_off(hub, make_cfg, tmp_path, monkeypatch):
    """``model.vae_path=owner/name``: staged beside the model (its config and diffusers weights only), pinned
    to a commit in the run's identity, and what the job loads as its VAE with the hub switched off."""
    import torch
    from huggingface_hub import constants
    from safetensors.torch import load_file

    from sdcluster import paths
    from sdcluster.models.load import load_components

    overrides = ["model=tiny_sdxl", f"model.vae_path={VAE_ID}", f"model.cache_dir={tmp_path / 'hf'}"]
    cfg = make_cfg(overrides)
    unpinned = paths.run_dir(cfg)
    said: list[str] = []
    cfg, staged = stage_for_launch(cfg, say=said.append)
    assert staged is None and cfg.model.vae_commit == COMMIT  # no hub model; the VAE pinned
    assert any(line.startswith(f"model.vae_path: {VAE_ID} main -> commit {COMMIT}") for line in said)
    assert paths.run_dir(cfg) != unpinned
    with pytest.raises(ConfigError, match=r"model\.vae_path: 'test-org/no-such-vae' is not a model"):
        stage_for_launch(make_cfg([*overrides[:1], "model.vae_path=test-org/no-such-vae"]), say=print)
    hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    comps = load_components(cfg.model, cfg.cache_root)
    folder = next((tmp_path / "hf").glob("models--test-org--tiny-vae-fp16-fix/snapshots/*"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(comps.vae.state_dict()[k], v) for k, v in weights.items())
    missing = make_cfg([*overrides[:1], f"model.vae_path={VAE_ID}", f"model.cache_dir={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match=r"model\.vae_path: .*fetch model\.vae_path=test-org/tiny-vae"):
        stage_for_launch(missing, say=print)  # the hub is off and this cache never saw the VAE


def test_fetch_cli_prints_the_commit_and_folder(hub, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    cmd = [sys.executable, "-m", "sdcluster.models", "fetch"]
    done = subprocess.run(
        [*cmd, REPO_ID, f"model.cache_dir={tmp_path / 'hf'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "hf" / "models--test-org--tiny-sd" / "snapshots" / COMMIT
    assert f"commit {COMMIT}" in done.stdout and done.stdout.strip().splitlines()[-1] == str(folder)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    bad = subprocess.run(
        [*cmd, "model.path=test-org/typo"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "not a model on the hub" in bad.stderr and "Fix:" in bad.stderr


@pytest.mark.slow
def test_a_job_trains_offline_from_the_staged_copy_and_records_the_commit(
    hub, make_cfg, tmp_path, monkeypatch
):
    """Gated model, token in the environment: staged; then launch and job run without asking the hub.

    The hub stays up and the job's environment points at it with ``HF_HUB_OFFLINE=0``: only the job's own
    switch keeps its ranks from asking it (the login side stays in the cache, as after staging offline).
    """
    from huggingface_hub import constants

    from sdcluster.cluster.submit_and_wait import launch

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the local job's process reaches the live hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the job must switch the hub off by itself
    quick = ["train.max_steps=2", "train.validate_every=0", "train.validation_prompts=[]", "task=train"]
    stage(_cfg(make_cfg, tmp_path, f"model.path={GATED_ID}").model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the login side: from the cache from here on
    asked = len(hub.requests)
    cfg = _cfg(make_cfg, tmp_path, f"model.path={GATED_ID}", *quick)
    said: list[str] = []
    assert launch(cfg, say=said.append) == 0, "\n".join(said)
    assert hub.requests[asked:] == [], "a rank of the job asked the hub"
    assert cfg.model.commit is None, "the launch submits a pinned copy, the caller's config stays as typed"
    (job,) = [p.parent for p in (tmp_path / "jobs").glob("*/job.json")]
    record = json.loads((job / "job.json").read_text())
    assert record["state"] == "COMPLETED" and record["model"]["commit"] == COMMIT
    log = "\n".join(p.read_text() for p in job.glob("*.out"))
    assert f"commit {COMMIT}, read from" in log and "HF_HUB_OFFLINE=1" in log
    from sdcluster import paths

    pinned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, commit=COMMIT))
    origin = json.loads((paths.run_paths(pinned).model / "sdcluster-model.json").read_text())
    assert origin == {"path": GATED_ID, "revision": None, "commit": COMMIT, "variant": None}
    for root in (tmp_path / "outputs", tmp_path / "jobs", tmp_path / "hf"):
        for path in (p for p in root.rglob("*") if p.is_file()):
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
