"""Publish a finished run on the hub, from the login node: ``python -m sdcluster.models push RUN --repo ID``.

What goes up is one export folder of the run, as training wrote it (``lora/`` by default when the run has
one, else ``model/``; ``--export`` picks): its weights, the files made for other tools, ``validation.png``
and the model card (:data:`CARD_FILE`), nothing else of the run folder (no checkpoints, config record, logs).
The repo then holds exactly that folder: files the export no longer has are deleted in the same commit.

Which run a repo holds is read from its card: the ``sdcluster.identity`` of its metadata (the run's identity
hash, :func:`sdcluster.identity.config_hash`). A new or empty repo (``.gitattributes`` only) takes any run;
one holding the same run is updated (only the files that changed are sent); one holding another run, or
files no sdcluster run made, is refused unless ``--force``. Everything is checked before a byte is sent: the
folder is a finished run, a token is in the environment (``HF_TOKEN``, or the login ``hf auth login``
stored: huggingface_hub's ``get_token``; never an argument, which would land in the shell history), the hub
accepts it, and it may write the repo. A new repo is private unless ``--public``.

The upload is huggingface_hub's ``upload_folder``, the call its authors made for publishing a folder: an
export is a few dozen files at most (an SDXL pipeline: about 20 files, 7 GB), which it commits at once
(a reader never sees half an export), skipping the files the hub already has (compared by hash), with a
progress bar, and resumable: after an interruption the same command sends only what the hub lacks (Xet
storage deduplicates what was sent; over LFS, the hub answers that it holds those objects).
``upload_large_folder`` is made for folders of hundreds of gigabytes in thousands of files: many commits,
and a resume record written into the folder itself; ``create_commit`` is what ``upload_folder`` calls.

Jobs never run this: they need no token and no network for publishing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub.constants import REPOCARD_NAME

from sdcluster.config import ConfigError
from sdcluster.config.generate import LORA_WEIGHTS
from sdcluster.paths import RunPaths

if TYPE_CHECKING:
    from collections.abc import Callable

    from huggingface_hub import HfApi

CARD_FILE = REPOCARD_NAME  # the card the hub shows as the repo's page
EXPORTS = {"lora": LORA_WEIGHTS, "model": "model_index.json"}
"""The export folders of a run (:class:`sdcluster.paths.RunPaths`), in the order ``push`` picks one, each
with the file that shows it is complete (an export is published in one rename: it is there or not)."""
EMPTY_REPO = {".gitattributes"}  # what the hub puts in a new repo
_TOKENS = "https://huggingface.co/settings/tokens"


class PushError(ConfigError):
    """What stops a push, with its fix: before anything is uploaded, except a hub failing mid-upload."""


@dataclass(frozen=True)
class Export:
    """One export folder of a run and the identity its card records."""

    folder: Path
    run: str
    identity: str

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


def card_identity(card_file: Path) -> tuple[str, str] | None:
    """``(run, identity)`` from a model card's ``sdcluster`` metadata; None for a card that has none."""
    from huggingface_hub import ModelCard

    try:
        facts = getattr(ModelCard.load(card_file).data, "sdcluster", None)
    except ValueError:  # no metadata block, or one that does not parse: not a card sdcluster wrote
        return None
    if not isinstance(facts, dict) or not facts.get("identity"):
        return None
    return str(facts.get("run")), str(facts["identity"])


def find_export(run_folder: Path, which: str | None = None) -> Export:
    """The export of ``run_folder`` to publish (``which``: a key of :data:`EXPORTS`, else the first found)."""
    run = RunPaths(run_folder)
    if not run_folder.is_dir():
        raise PushError(
            f"{run_folder} does not exist. Fix: give a run folder, e.g. outputs/runs/<name>-<hash>"
        )
    if not run.config.is_file():
        is_export = RunPaths(run_folder.parent).config.is_file()
        hint = f" (it is an export: give its run folder, {run_folder.parent})" if is_export else ""
        raise PushError(
            f"{run_folder} is not a run folder: it has no {run.config.name}{hint}. Fix: give the folder "
            "training wrote, outputs/runs/<name>-<hash>"
        )
    names = [which] if which else list(EXPORTS)
    found = [getattr(run, name) for name in names if (getattr(run, name) / EXPORTS[name]).is_file()]
    if not found:
        wanted = f"{which}/" if which else " or ".join(f"{name}/" for name in EXPORTS)
        raise PushError(
            f"{run_folder} has no export yet ({wanted}): training has not finished. Fix: wait for its job "
            "(`sdcluster logs`), or launch the same command again to resume and finish it"
        )
    folder = found[0]
    recorded = card_identity(folder / CARD_FILE) if (folder / CARD_FILE).is_file() else None
    if recorded is None:
        raise PushError(
            f"{folder} has no model card with the run's identity ({CARD_FILE}): it was exported by an older "
            "sdcluster. Fix: launch the run's command again (a finished run resumes at its last step and "
            "only exports again, with its card)"
        )
    return Export(folder, *recorded)


def hub_token() -> str:
    """The token huggingface_hub would send (``HF_TOKEN``, else the stored login), or the fix."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PushError(
            "HF_HUB_OFFLINE is set: pushing needs the hub. Fix: unset HF_HUB_OFFLINE in this shell"
        )
    token = get_token()
    if not token:
        raise PushError(
            f"no hub token in this shell. Fix: create a token with write access on {_TOKENS} and export "
            "HF_TOKEN=... (or run `hf auth login`); never give it as an argument"
        )
    return token


def _refused(err: Exception, repo_id: str) -> PushError:
    """The PushError for an answer of the hub (a refused token, a repo it may not write, no hub)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, httpx2.TransportError):
        return PushError(
            f"cannot reach the hub at {constants.ENDPOINT} ({err}). Fix: push from a node with internet"
        )
    status = err.response.status_code if isinstance(err, HfHubHTTPError) else None
    if status == 401:
        return PushError(
            f"the hub refused the token (401: invalid or expired). Fix: create a token with write access on "
            f"{_TOKENS} and export HF_TOKEN=... (HF_TOKEN wins over `hf auth login`)"
        )
    if status == 403:
        return PushError(
            f"the token may not write {repo_id} (403). Fix: use a token with write access to "
            f"{repo_id.split('/')[0]} (a fine-grained token needs write access to that namespace)"
        )
    if status == 412:  # parent_commit: the repo moved on since it was checked
        return PushError(
            f"{repo_id} changed while this push ran (another push?). Fix: run the same command again: it "
            "checks anew which run the repo holds"
        )
    if status is not None and status >= 500:
        return PushError(
            f"the hub failed during the push to {repo_id} ({status}). Fix: run the same command again: it "
            "sends only what the hub does not hold yet"
        )
    return PushError(f"the hub refused the push to {repo_id} ({err}). Fix: check HF_ENDPOINT and the repo id")


def check_account(api: HfApi, repo_id: str) -> str:
    """The token's user, when the token may write in ``repo_id``'s namespace (what whoami tells)."""
    who = api.whoami()
    owner, user = repo_id.split("/")[0], who["name"]
    role = who.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise PushError(f"the token of {user} is read-only. Fix: create one with write access on {_TOKENS}")
    if owner not in (user, *(org["name"] for org in who.get("orgs", []))):
        raise PushError(
            f"{user} may not publish under {owner}/ (not the user nor one of its organizations). "
            f"Fix: --repo {user}/{repo_id.split('/')[1]}, or a token of an account in {owner}"
        )
    return user


@dataclass(frozen=True)
class Remote:
    """A hub repo as it is: its commit, visibility, files, and the run its card names (None: no such card)."""

    commit: str
    private: bool
    files: set[str]
    holds: tuple[str, str] | None


def remote_run(api: HfApi, repo_id: str) -> Remote | None:
    """The repo ``repo_id`` as the token sees it; None when there is none (or it is private to another)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        return None
    files = {s.rfilename for s in info.siblings or []}
    holds = None
    if CARD_FILE in files:
        with tempfile.TemporaryDirectory() as tmp:  # read once, not kept in the hub cache
            card = api.hf_hub_download(repo_id, CARD_FILE, revision=info.sha, cache_dir=tmp)
            holds = card_identity(Path(card))
    return Remote(str(info.sha), bool(info.private), files, holds)


def check_owner(export: Export, repo_id: str, remote: Remote) -> str:
    """Why ``export`` may replace what the repo holds: it is empty or holds the same run (else the fix)."""
    if remote.files <= EMPTY_REPO:
        return "empty"
    if remote.holds is not None and remote.holds[1] == export.identity:
        return "the same run"
    other = remote.holds
    what = (
        f"run {other[0]} (identity {other[1]})"
        if other
        else f"{len(remote.files)} files no sdcluster run made"
    )
    raise PushError(
        f"{repo_id} holds {what}, not {export.run} (identity {export.identity}). Fix: push to a new repo "
        "with --repo, or add --force to replace its files with this run's"
    )


def push(
    run_folder: Path,
    repo_id: str,
    *,
    public: bool = False,
    force: bool = False,
    which: str | None = None,
    say: Callable[[str], Any] = print,
) -> str:
    """Publish the export of ``run_folder`` to ``repo_id``; return the commit the repo is at afterwards."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise PushError(f"--repo {repo_id!r} is not owner/name. Fix: e.g. --repo your-name/my-lora")
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise PushError(f"--repo {repo_id!r}: {err}") from err
    export = find_export(run_folder, which)
    api = HfApi(token=hub_token())
    try:
        check_account(api, repo_id)
        remote = remote_run(api, repo_id)
        if remote is None:
            api.create_repo(repo_id, private=not public, exist_ok=True)
            remote, reason = remote_run(api, repo_id), "new repo"
            if remote is None:  # it exists, private to someone else
                raise PushError(f"{repo_id} exists and your token cannot see it. Fix: push to another --repo")
        else:
            reason = "forced" if force else check_owner(export, repo_id, remote)
        return _upload(api, export, repo_id, remote, reason, say)
    except (HfHubHTTPError, httpx2.TransportError) as err:  # the hub's answer, or none
        raise _refused(err, repo_id) from err


def _upload(api: HfApi, export: Export, repo_id: str, remote: Remote, reason: str, say: Callable) -> str:
    """``upload_folder`` of the export on top of the commit that was checked (``parent_commit``: a push
    made meanwhile by someone else makes this one fail instead of mixing two runs)."""
    files = export.files()
    size = sum(p.stat().st_size for p in files)
    visibility = "private" if remote.private else "public"
    say(
        f"pushing {export.folder} ({len(files)} files, {size / 1e6:.1f} MB) to {api.endpoint}/{repo_id} "
        f"({visibility} repo: {reason})"
    )
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=export.folder,
        commit_message=f"{export.run}: {export.folder.name}/ export (run identity {export.identity})",
        delete_patterns="*",  # the repo holds exactly the export: files it no longer has go
        parent_commit=remote.commit,
    )
    if info.oid == remote.commit:
        say(f"{repo_id} already holds this export: nothing changed")
    else:
        say(f"{repo_id} at commit {info.oid}: {info.commit_url}")
    return str(info.oid)


def add_command(sub: Any) -> None:
    """The ``push`` subcommand of ``python -m sdcluster.models``."""
    cmd = sub.add_parser("push", help="publish a finished run's export and model card on the hub")
    cmd.add_argument("run_folder", type=Path, help="the run folder, outputs/runs/<name>-<hash>")
    cmd.add_argument("--repo", required=True, help="owner/name of the hub repo (created if new)")
    cmd.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    cmd.add_argument("--force", action="store_true", help="replace the files of another run in the repo")
    cmd.add_argument(
        "--export", choices=list(EXPORTS), help="which export (default: lora/ if any, else model/)"
    )


def command(args: argparse.Namespace) -> int:
    """Run ``push`` from parsed arguments; exit 2 with the fix when something stops it."""
    try:
        push(args.run_folder, args.repo, public=args.public, force=args.force, which=args.export)
    except PushError as err:
        print(f"sdcluster: cannot push: {err}", file=sys.stderr)
        return 2
    return 0
