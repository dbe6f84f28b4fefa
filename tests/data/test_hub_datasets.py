"""Hub datasets are staged on the login node like hub models: resolved to a commit, checked, the split's files
downloaded once, written out as an imagefolder that jobs read with the hub off.

The hub is :mod:`tests.hub_server` on loopback serving two dataset repos in the layouts the hub has: parquet
files with embedded images (a ``datasets`` Image feature, with a README whose ``configs:`` name the splits'
files) and an imagefolder repo (images + ``metadata.jsonl`` per split folder, no README).
"""

from __future__ import annotations

import csv as csv_module
import dataclasses
import io
import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from sdcluster import identity
from sdcluster.cluster.preflight import preflight
from sdcluster.config import ConfigError
from sdcluster.data.dataset import load_captioned_images
from sdcluster.data.hub import HubDataSpec, stage_data_for_launch, stage_dataset
from sdcluster.data.loader import training_rows
from sdcluster.data.metadata import validate
from sdcluster.paths import sample_data_dir
from tests.conftest import compose
from tests.hub_server import HubServer, Repo

PARQUET_ID = "test-org/jeans-parquet"
FOLDER_ID = "test-org/jeans-folder"
GATED_ID = "test-org/jeans-gated"
HUGE_ID = "test-org/jeans-huge"  # says its train split is an exabyte: more than any disk has free
COMMIT = "3333333333333333333333333333333333333333"
NEWER = "4444444444444444444444444444444444444444"
TOKEN = "hf_DatasetStagingTokenNeverWrittenAnywhere7"
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# Jeans
"""


def _sample() -> list[dict]:
    lines = (sample_data_dir() / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _parquet(rows: list[dict]) -> bytes:
    """Rows as a parquet file the way ``datasets`` writes one: images embedded as {"bytes", "path"}."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    table = {
        "image": [
            # half keep their file name, half only bytes (the suffix then comes from the bytes)
            {
                "bytes": (sample_data_dir() / r["file_name"]).read_bytes(),
                "path": r["file_name"] if i % 2 else None,
            }
            for i, r in enumerate(rows)
        ],
        "caption": [r["text"] for r in rows],
        "label": list(range(len(rows))),
    }
    buffer = io.BytesIO()
    datasets.Dataset.from_dict(table, features=features).to_parquet(buffer)
    return buffer.getvalue()


def _folder_repo(rows: list[dict], held: list[dict]) -> dict[str, bytes]:
    """An imagefolder repo: train/ and test/ folders, each with its images; the captions of train/ in a
    metadata.csv, those of test/ in a metadata.jsonl (the two forms ``datasets`` reads)."""
    files: dict[str, bytes] = {}
    for split, entries in (("train", rows), ("test", held)):
        for r in entries:
            files[f"{split}/{r['file_name']}"] = (sample_data_dir() / r["file_name"]).read_bytes()
    files["test/metadata.jsonl"] = "".join(json.dumps(r) + "\n" for r in held).encode()
    csv = io.StringIO()
    writer = csv_module.writer(csv)
    writer.writerows([["file_name", "text"], *([r["file_name"], r["text"]] for r in rows)])
    files["train/metadata.csv"] = csv.getvalue().encode()
    return files


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The loopback hub with the two layouts (and a gated copy), huggingface_hub pointed at it, no token."""
    from huggingface_hub import constants

    rows = _sample()
    parquet = {
        "README.md": README.encode(),
        "data/train-00000-of-00001.parquet": _parquet(rows[:6]),
        "data/test-00000-of-00001.parquet": _parquet(rows[6:8]),
        "extras/originals.zip": b"raw photos no split reads",
    }
    main = {"main": COMMIT}
    repos = {
        f"datasets/{PARQUET_ID}": Repo(files=parquet, commit=COMMIT, refs=main),
        f"datasets/{FOLDER_ID}": Repo(files=_folder_repo(rows[:5], rows[5:7]), commit=COMMIT, refs=main),
        f"datasets/{HUGE_ID}": Repo(
            files=parquet,
            commit=COMMIT,
            refs=main,
            claimed_sizes={"data/train-00000-of-00001.parquet": 2**60},
        ),
        f"datasets/{GATED_ID}": Repo(
            files=parquet, commit=COMMIT, refs=main, gated=True, accepted_tokens={TOKEN}
        ),
    }
    with HubServer(repos) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest switches the hub off for the suite
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def _hub_cfg(make_cfg, tmp_path: Path, repo: str, *extra: str):
    return make_cfg(["data=hub", f"data.name={repo}", f"data.cache_dir={tmp_path / 'hf'}", *extra])


def _fetched(hub: HubServer) -> list[str]:
    return [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]


def test_a_parquet_dataset_is_staged_once_as_an_imagefolder_with_its_bytes(hub, make_cfg, tmp_path):
    cfg = _hub_cfg(make_cfg, tmp_path, PARQUET_ID, "data.caption_column=caption")
    said: list[str] = []
    staged = stage_data_for_launch(cfg, say=said.append)
    assert staged.data.commit == COMMIT and cfg.data.commit is None, "the launch's copy is pinned"
    assert hub.downloaded() == {"README.md", "data/train-00000-of-00001.parquet"}, "the train split only"
    folder = Path(staged.data.path)
    assert folder.is_relative_to(tmp_path / "hf") and any(COMMIT in line for line in said)
    assert validate(folder, caption_column="caption") == []
    rows = load_captioned_images(folder, "caption")
    sample = _sample()[:6]
    assert list(rows["caption"]) == [r["text"] for r in sample], "the dataset's row order and captions"
    written = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    assert [p.read_bytes() for p in written] == [
        (sample_data_dir() / r["file_name"]).read_bytes() for r in sample
    ]

    before = _fetched(hub)
    again = stage_data_for_launch(cfg, say=said.append)
    assert again.data.path == staged.data.path and again.data.commit == COMMIT
    assert [p for p in _fetched(hub) if p.endswith(".parquet")] == [
        p for p in before if p.endswith(".parquet")
    ]


def test_an_imagefolder_repo_stages_its_split_and_trains_like_a_local_folder(hub, make_cfg, tmp_path):
    cfg = _hub_cfg(make_cfg, tmp_path, FOLDER_ID, "data.split=test", "data.holdout=1", "data.max_samples=1")
    staged = stage_data_for_launch(cfg, say=lambda _: None)
    downloaded = {unquote(p) for p in hub.downloaded()}
    assert downloaded == {f"test/{r['file_name']}" for r in _sample()[5:7]} | {"test/metadata.jsonl"}
    rows = load_captioned_images(staged.data.path)
    assert list(rows["text"]) == [r["text"] for r in _sample()[5:7]]
    # the same holdout and max_samples code as a folder: one held out, one trained on
    assert len(training_rows(staged)) == 1
    train = stage_data_for_launch(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="train")))
    assert list(load_captioned_images(train.data.path)["text"]) == [r["text"] for r in _sample()[:5]]


def test_the_commit_names_the_run_and_the_cache_folder_does_not(hub, make_cfg, tmp_path):
    cfg = _hub_cfg(make_cfg, tmp_path, PARQUET_ID, "data.caption_column=caption")
    staged = stage_data_for_launch(cfg, say=lambda _: None)
    other_cache = dataclasses.replace(staged.data, cache_dir="/elsewhere", path="/elsewhere/x")
    assert identity.run_hash(dataclasses.replace(staged, data=other_cache)) == identity.run_hash(staged)
    newer = dataclasses.replace(staged.data, commit=NEWER)
    assert identity.run_hash(dataclasses.replace(staged, data=newer)) != identity.run_hash(staged)
    assert identity.semantic_train_config(staged)["data"]["revision"] == COMMIT
    split = dataclasses.replace(staged.data, split="test")
    assert identity.run_hash(dataclasses.replace(staged, data=split)) != identity.run_hash(staged)


def test_a_folder_run_keeps_its_hash():
    folder = compose(["data=imagefolder", "data.path=/datasets/x"])
    data = identity.semantic_train_config(folder)["data"]
    assert not {"hub", "revision", "commit", "split", "image_column", "cache_dir"} & set(data)


def test_jobs_read_the_staged_dataset_with_the_hub_off(hub, make_cfg, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cfg = _hub_cfg(make_cfg, tmp_path, PARQUET_ID, "data.caption_column=caption")
    staged = stage_data_for_launch(cfg, say=lambda _: None)
    hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = stage_dataset(HubDataSpec.of(staged.data))  # a resubmission pinned to the commit
    assert again.offline and again.commit == COMMIT and str(again.folder) == staged.data.path
    other = dataclasses.replace(staged.data, split="test", commit=None, path="")
    with pytest.raises(ConfigError, match=r"data\.name: the hub cannot be reached .*Fix:"):
        stage_dataset(HubDataSpec.of(other))  # never staged: said, not guessed


@pytest.mark.parametrize(
    ("repo", "extra", "message"),
    [
        ("test-org/no-such-set", [], r"data\.name: 'test-org/no-such-set' is not a dataset on the hub.*Fix:"),
        (GATED_ID, [], r"data\.name: the dataset test-org/jeans-gated is gated and no token was sent.*Fix:"),
        (PARQUET_ID, ["data.revision=v9"], r"data\.revision: 'v9' is not a branch, tag or commit.*Fix:"),
        (PARQUET_ID, ["data.split=validation"], r"data\.split: .* has no split 'validation'; its splits: "),
        (
            PARQUET_ID,
            [],
            r"data\.caption_column: 'text' is not a column .*caption, label.*data\.caption_column=caption",
        ),
        (
            PARQUET_ID,
            ["data.image_column=img", "data.caption_column=caption"],
            r"data\.image_column: 'img' is not a column .* Fix: data\.image_column=image",
        ),
        (
            PARQUET_ID,
            ["data.image_column=caption", "data.caption_column=caption"],
            r"data\.image_column: the column 'caption' .* not images\. Fix: data\.image_column=image",
        ),
        (FOLDER_ID, ["data.caption_column=label"], r"data\.caption_column: 'label' is not a column"),
        (HUGE_ID, [], r"data\.cache_dir: .* GiB free, but the dataset test-org/jeans-huge .*Fix:"),
    ],
)
def test_every_failure_is_named_before_the_queue_with_its_fix(hub, make_cfg, tmp_path, repo, extra, message):
    cfg = _hub_cfg(make_cfg, tmp_path, repo, "task=train", *extra)
    with pytest.raises(ConfigError, match=message):
        preflight(cfg)
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir()), "nothing submitted"


def test_a_dry_run_resolves_and_checks_the_split_but_downloads_nothing(hub, make_cfg, tmp_path):
    cfg = _hub_cfg(make_cfg, tmp_path, PARQUET_ID, "task=train", "data.caption_column=caption")
    submitted, unchecked = preflight(cfg, dry_run=True)
    assert submitted.data.commit == COMMIT
    assert not any(p.endswith(".parquet") for p in _fetched(hub)), "only the README"
    assert any(PARQUET_ID in line for line in unchecked)


@pytest.mark.slow
def test_a_job_trains_on_the_staged_dataset_offline_and_records_the_commit(
    hub, make_cfg, tmp_path, monkeypatch
):
    """Staged once; then launch (from the cache) and the job (with the hub reachable but switched off by the
    job itself) never ask the hub; the run's records name the dataset's commit."""
    from huggingface_hub import constants

    from sdcluster.cluster.submit_and_wait import launch

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the local job's process could reach the live hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the job must switch the hub off by itself
    quick = ["train.max_steps=2", "train.validate_every=0", "train.validation_prompts=[]", "task=train"]
    cfg = _hub_cfg(make_cfg, tmp_path, PARQUET_ID, "data.caption_column=caption", "data.holdout=1", *quick)
    stage_data_for_launch(cfg, say=lambda _: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the login side: from the cache from here on
    asked = len(hub.requests)
    said: list[str] = []
    assert launch(cfg, say=said.append) == 0, "\n".join(said)
    assert hub.requests[asked:] == [], "the launch or a rank of the job asked the hub"
    (job,) = [p.parent for p in (tmp_path / "jobs").glob("*/job.json")]
    record = json.loads((job / "job.json").read_text())
    assert record["state"] == "COMPLETED", record
    assert record["data"]["commit"] == COMMIT and record["data"]["name"] == PARQUET_ID
    written = next((tmp_path / "outputs").rglob("config.yaml")).read_text()
    assert COMMIT in written and "split: train" in written
