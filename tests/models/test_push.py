"""``python -m sdcluster.models push``: a finished run's export and card go to the hub, and nothing else.

The hub is :mod:`tests.hub_upload` on loopback (accounts, repo creation, preupload, LFS batch + PUT, commits),
spoken to by huggingface_hub's own ``upload_folder`` over LFS (``HF_HUB_DISABLE_XET``: the loopback hub has no
Xet store). The run folders are LoRA runs as training leaves them, their cards written by the exporter's own
``write_card``; one slow test pushes a run that really trained.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster.config.generate import LORA_WEIGHTS
from sdcluster.identity import config_hash
from sdcluster.models.family import SD1
from sdcluster.models.push import CARD_FILE, PushError, push
from sdcluster.paths import RunPaths
from sdcluster.redaction import config_yaml
from sdcluster.train.model_card import write_card
from tests.hub_server import Repo
from tests.hub_upload import GITATTRIBUTES, Account, UploadHub

TOKEN = "hf_PushTestTokenOfAliceNeverWritten42"
READ_ONLY = "hf_PushTestReadOnlyTokenOfBob000042"
NO_WRITE = "hf_PushTestFineGrainedTokenCarol0042"
OTHER_ID = "alice/other-run"
EMPTY_ID = "alice/made-on-the-website"
FOREIGN_ID = "alice/not-sdcluster"
OTHER_CARD = b"---\nsdcluster:\n  run: sd15-0000aaaa\n  identity: 0000aaaa11112222\n---\n# another run\n"
WEIGHTS = bytes(range(256)) * 64  # binary: an LFS file on the hub


def _run(make_cfg, root: Path, name: str = "tiny-lora", extra: tuple[str, ...] = ()) -> RunPaths:
    """A finished LoRA run folder: its config record, metrics, and ``lora/`` as the exporter leaves it."""
    cfg = make_cfg(["train.method=lora", *extra])
    run = RunPaths(root / name)
    run.lora.mkdir(parents=True)
    (run.checkpoints / "step-00000002").mkdir(parents=True)
    (run.checkpoints / "step-00000002" / "model.safetensors").write_bytes(b"a checkpoint: never published")
    run.config.write_text(config_yaml(cfg))
    run.metrics.write_text('{"step": 2, "val_loss": 0.5}\n')
    (run.validation / "step-00000002").mkdir(parents=True)
    (run.validation / "step-00000002" / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n\0 a grid")
    (run.lora / LORA_WEIGHTS).write_bytes(WEIGHTS)
    (run.lora / f"{name}_kohya.safetensors").write_bytes(WEIGHTS[::-1])
    assert write_card(run.lora, run.root, SD1()) is not None
    return run


@pytest.fixture
def run(make_cfg, tmp_path: Path) -> RunPaths:
    return _run(make_cfg, tmp_path / "outputs" / "runs")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The loopback hub with alice (writes alice/ and team/), a read-only and a no-write token, and three
    repos of alice: another run's, an empty one and one sdcluster did not make; HF_TOKEN is alice's."""
    from huggingface_hub import constants

    accounts = {
        TOKEN: Account("alice", orgs=("team",)),
        READ_ONLY: Account("bob", role="read"),
        NO_WRITE: Account("carol", role="fineGrained"),
    }
    repos = {
        OTHER_ID: _repo({CARD_FILE: OTHER_CARD, LORA_WEIGHTS: b"\0other weights"}),
        EMPTY_ID: _repo({}),
        FOREIGN_ID: _repo({"model.ckpt": b"\0weights", CARD_FILE: b"# a hand-written card\n"}),
    }
    with UploadHub(repos, accounts) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest switches the hub off for the suite
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored login
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def _repo(files: dict[str, bytes]) -> Repo:
    files = {".gitattributes": GITATTRIBUTES, **files}
    return Repo(files=files, commit="c" * 40, refs={"main": "c" * 40})


def _folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _writes(hub: UploadHub) -> list[tuple[str, str]]:
    """Every request that created, uploaded or committed something (or asked to)."""
    return [(m, p) for m, p, _ in hub.requests if m in ("POST", "PUT") and not p.endswith("validate-yaml")]


def test_a_new_repo_is_private_and_holds_the_export_and_card_only(hub, run):
    said: list[str] = []
    commit = push(run.root, "alice/my-lora", say=said.append)
    repo = hub.repos["alice/my-lora"]
    assert repo.private and repo.commit == commit
    assert repo.files == {".gitattributes": GITATTRIBUTES, **_folder(run.lora)}  # no checkpoint, no config
    assert {
        CARD_FILE,
        LORA_WEIGHTS,
        "validation.png",
        f"{run.root.name}_kohya.safetensors",
    } <= repo.files.keys()
    card = repo.files[CARD_FILE].decode()
    assert f"identity: {config_hash_of(run)}" in card
    assert set(hub.uploaded()) >= {_sha256(WEIGHTS)}  # weights went through LFS, not in the commit body
    assert "private repo: new repo" in said[0] and commit in said[-1]
    assert hub.commits[-1].summary.startswith(f"{run.root.name}: lora/ export")

    push(run.root, "alice/shared", public=True)
    assert not hub.repos["alice/shared"].private


def config_hash_of(run: RunPaths) -> str:
    from sdcluster.train.model_card import run_config

    return config_hash(run_config(run.root))


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_the_same_run_again_sends_only_what_changed(hub, run):
    first = push(run.root, "alice/my-lora")
    puts, commits = len(hub.uploaded()), len(hub.commits)
    said: list[str] = []
    assert push(run.root, "alice/my-lora", say=said.append) == first  # nothing changed: no commit
    assert len(hub.uploaded()) == puts and len(hub.commits) == commits
    assert "the same run" in said[0] and "nothing changed" in said[-1]

    new = b"\0a file the export gained"
    (run.lora / "extra.safetensors").write_bytes(new)
    kohya = next(run.lora.glob("*_kohya.safetensors"))
    kohya.unlink()  # and one it no longer has
    push(run.root, "alice/my-lora")
    assert hub.uploaded()[puts:] == [_sha256(new)]  # the unchanged weights are not sent again
    assert hub.commits[-1].added == ["extra.safetensors"] and hub.commits[-1].deleted == [kohya.name]
    assert hub.repos["alice/my-lora"].files == {".gitattributes": GITATTRIBUTES, **_folder(run.lora)}


def test_an_interrupted_push_resumes_without_sending_the_weights_again(hub, run):
    hub.fail_commits = 1  # the weights go up, then the commit fails
    with pytest.raises(PushError, match="same command again"):
        push(run.root, "alice/my-lora")
    sent = hub.uploaded()
    assert _sha256(WEIGHTS) in sent and hub.repos["alice/my-lora"].files.keys() == {".gitattributes"}
    push(run.root, "alice/my-lora")
    assert hub.uploaded() == sent  # the hub held those objects: nothing sent twice
    assert hub.repos["alice/my-lora"].files == {".gitattributes": GITATTRIBUTES, **_folder(run.lora)}


@pytest.mark.parametrize("repo_id", [OTHER_ID, FOREIGN_ID])
def test_a_repo_of_another_run_is_refused_before_anything_is_sent_unless_forced(hub, run, repo_id):
    before = dict(hub.repos[repo_id].files)
    with pytest.raises(PushError) as err:
        push(run.root, repo_id)
    message = str(err.value)
    assert "--force" in message and run.root.name in message
    assert ("sd15-0000aaaa" in message) == (repo_id == OTHER_ID)
    assert _writes(hub) == [] and hub.repos[repo_id].files == before

    push(run.root, repo_id, force=True)  # the other run's files go, the export comes
    assert hub.repos[repo_id].files == {".gitattributes": GITATTRIBUTES, **_folder(run.lora)}


def test_an_empty_repo_takes_any_run(hub, run):
    said: list[str] = []
    push(run.root, EMPTY_ID, say=said.append)
    assert "empty" in said[0] and hub.repos[EMPTY_ID].files.keys() == {".gitattributes", *_folder(run.lora)}
    assert not hub.repos[EMPTY_ID].private  # made public on the website: a push does not change it


@pytest.mark.parametrize(
    ("token", "repo_id", "expected"),
    [
        (None, "alice/x", "no hub token.*export HF_TOKEN"),
        ("hf_RefusedTokenNotKnownToTheHub00042", "alice/x", "refused the token \\(401"),
        (READ_ONLY, "bob/x", "read-only.*write access"),
        (NO_WRITE, "carol/x", "may not write carol/x \\(403\\)"),
        (TOKEN, "someone-else/x", "alice may not publish under someone-else/.*--repo alice/x"),
        (TOKEN, "no-owner", "not owner/name"),
    ],
)
def test_the_token_and_repo_are_checked_before_anything_is_sent(
    hub, run, monkeypatch, token, repo_id, expected
):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    repos = set(hub.repos)
    with pytest.raises(PushError, match=expected):
        push(run.root, repo_id)
    writes = [w for w in _writes(hub) if w[1] != "/api/repos/create"]  # a refused creation sends no file
    assert writes == [] and set(hub.repos) == repos and not hub.lfs


def test_a_folder_that_is_not_a_finished_run_is_refused_before_the_hub_is_asked(hub, run, tmp_path):
    with pytest.raises(PushError, match="does not exist"):
        push(tmp_path / "nowhere", "alice/x")
    with pytest.raises(PushError, match=r"not a run folder: it has no config.yaml. Fix"):
        push(tmp_path, "alice/x")
    with pytest.raises(PushError, match=f"it is an export: give its run folder, {run.root}"):
        push(run.lora, "alice/x")
    with pytest.raises(PushError, match=r"no export yet.*model/.*not finished"):
        push(run.root, "alice/x", which="model")
    shutil.rmtree(run.lora)
    with pytest.raises(PushError, match=r"no export yet.*Fix: wait for its job"):
        push(run.root, "alice/x")
    assert hub.requests == []


def test_an_export_without_the_run_s_card_is_refused(hub, run):
    (run.lora / CARD_FILE).write_text("# a card without sdcluster's metadata\n")
    with pytest.raises(PushError, match="no model card with the run's identity"):
        push(run.root, "alice/x")


def test_the_command_line(hub, run, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # no stored login
        "HF_TOKEN": TOKEN,
    }
    command = [sys.executable, "-m", "sdcluster.models", "push", str(run.root), "--repo", "team/cli-lora"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "private repo: new repo" in done.stdout and hub.repos["team/cli-lora"].commit in done.stdout
    assert TOKEN not in done.stdout + done.stderr
    assert f"{LORA_WEIGHTS}: 100%" in done.stderr  # huggingface_hub's progress bar, per file

    env.pop("HF_TOKEN")
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "cannot push: no hub token" in refused.stderr


def test_no_hub_is_said_with_the_fix(hub, run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match=r"HF_HUB_OFFLINE is set.*Fix: unset"):
        push(run.root, "alice/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.close()
    with pytest.raises(PushError, match=r"cannot reach the hub at http://127\.0\.0\.1.*Fix: push from"):
        push(run.root, "alice/x")


@pytest.mark.slow
def test_a_run_that_trained_comes_back_from_the_hub_bit_for_bit(hub, make_cfg, tmp_path):
    from huggingface_hub import snapshot_download

    from sdcluster.train.loop import train

    overrides = [
        "train.method=lora",
        "train.max_steps=2",
        "train.validate_every=1",
        "train.checkpoint_every=1",
    ]
    cfg = make_cfg([*overrides, "train.validation_steps=2", "train.export_formats=[diffusers,kohya]"])
    run = RunPaths(train(cfg).run_dir)
    push(run.root, "team/trained")
    back = Path(snapshot_download("team/trained", cache_dir=tmp_path / "download", token=TOKEN))
    assert _folder(back) == {".gitattributes": GITATTRIBUTES, **_folder(run.lora)}
    assert {LORA_WEIGHTS, CARD_FILE, "validation.png", f"{run.root.name}_kohya.safetensors"} <= _folder(
        back
    ).keys()
    assert list(run.checkpoints.iterdir())  # checkpoints there are, and none went up


def test_a_push_landing_meanwhile_is_not_overwritten(hub, run):
    other = hub.repos[OTHER_ID]
    push(run.root, EMPTY_ID)  # this run's repo
    before = hub.repos[EMPTY_ID].commit
    (run.lora / "extra.safetensors").write_bytes(b"\0more")
    # after the check (the repo holds this run), another run is pushed there before the commit
    hub.on_preupload = lambda: hub.repos[EMPTY_ID].push(dict(other.files), "d" * 40)
    with pytest.raises(PushError, match=r"changed while this push ran.*run the same command again"):
        push(run.root, EMPTY_ID)
    assert hub.repos[EMPTY_ID].commit == "d" * 40 != before  # the other push stands, untouched
    hub.on_preupload = None
    with pytest.raises(PushError, match="holds run sd15-0000aaaa"):  # and checking again finds it
        push(run.root, EMPTY_ID)
