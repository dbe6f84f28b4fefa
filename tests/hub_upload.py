"""The loopback hub of :mod:`tests.hub_server`, with accounts and the upload protocol of huggingface_hub 2.x.

What ``HfApi.create_repo``, ``upload_folder`` (``create_commit``) and ``whoami`` call, as huggingface.co
answers them (``hf_api.py``, ``_commit_api.py``, ``lfs.py``):

- ``GET /api/whoami-v2``: the token's account, its organizations and the token's role (401 unknown token);
- ``POST /api/repos/create``: a new repo holding ``.gitattributes`` (409 when it exists, 403 in a namespace
  the token may not write);
- ``POST /api/validate-yaml``: the card's metadata (always valid here);
- ``POST /api/models/{repo}/preupload/{rev}``: each file's upload mode (``lfs`` for weights and binary files,
  ``regular`` otherwise) and the oid of the file already there, which the client compares to skip it;
- ``POST /{repo}.git/info/lfs/objects/batch``: the LFS batch API, ``basic`` transfer: an upload action (a
  ``PUT`` to ``/lfs-upload/{oid}``, no token, like a presigned URL) for each object the store lacks, none
  for one it holds, which is how an interrupted upload resumes without sending those bytes again;
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (``header``, ``file``, ``lfsFile``,
  ``deletedFile``/``deletedFolder``), checked against ``parentCommit``; every commit is recorded.

Not served: Xet storage (its chunk store is a separate service): the tests set ``HF_HUB_DISABLE_XET``, and
huggingface_hub uploads through LFS, the protocol it falls back to without ``hf_xet``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from tests.hub_server import LFS_SUFFIXES, HubServer, Repo

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
REGULAR_MAX = 10 * 1024 * 1024  # larger files go to LFS on the hub, whatever they hold


@dataclass(frozen=True)
class Account:
    """A hub user: its name, the organizations it writes to, and its token's role (``read`` or ``write``)."""

    name: str
    orgs: tuple[str, ...] = ()
    role: str = "write"

    def may_write(self, repo_id: str) -> bool:
        return self.role == "write" and repo_id.split("/")[0] in (self.name, *self.orgs)


@dataclass
class Commit:
    """One commit the hub received: its repo, summary, the files it added or changed and those it deleted."""

    repo_id: str
    oid: str
    summary: str
    added: list[str]
    deleted: list[str]


def is_lfs(path: str, data: bytes) -> bool:
    """How the hub stores a file: LFS for weights, anything binary (a NUL in its first 512 bytes) or large."""
    return path.endswith(LFS_SUFFIXES) or b"\0" in data[:512] or len(data) > REGULAR_MAX


def remote_oid(path: str, data: bytes) -> str:
    """The oid preupload reports for a file in the repo: sha256 of an LFS file, git's blob sha1 otherwise."""
    if is_lfs(path, data):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class UploadHub(HubServer):
    """``with UploadHub(repos, {TOKEN: Account("alice")}) as hub``; ``hub.commits``; ``hub.lfs`` (by oid).

    ``fail_commits``: how many commits to answer with 503 first (an upload interrupted before its commit);
    ``on_preupload``: called as an upload begins (another client's commit landing meanwhile).
    """

    def __init__(self, repos: dict[str, Repo], accounts: dict[str, Account]) -> None:
        self.accounts = accounts
        self.commits: list[Commit] = []
        self.lfs: dict[str, bytes] = {}
        self.fail_commits = 0
        self.on_preupload: Callable[[], None] | None = None  # e.g. someone else's push, mid-upload
        super().__init__(repos)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _upload_handler(self, super().handler())

    def uploaded(self) -> list[str]:
        """The oids whose bytes were sent (PUT), in order."""
        return [path.rsplit("/", 1)[1] for m, path, _ in self.requests if m == "PUT"]


def _upload_handler(hub: UploadHub, base: type[BaseHTTPRequestHandler]) -> type[BaseHTTPRequestHandler]:
    class Handler(base):  # type: ignore[valid-type,misc]
        def _token(self) -> str | None:
            return self.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None

        def _account(self) -> Account | None:
            return hub.accounts.get(self._token() or "")

        def _repo(self, repo_id: str, token: str | None) -> Repo | None:
            if token is not None and token not in hub.accounts:
                self._error(401, "", "Invalid credentials in Authorization header")
                return None
            repo, account = hub.repos.get(repo_id), hub.accounts.get(token or "")
            if repo is not None and repo.private and not (account and account.may_write(repo_id)):
                self._error(404, "RepoNotFound", "Repository not found")  # the hub hides private repos
                return None
            return super()._repo(repo_id, token)

        def _writable(self, repo_id: str) -> Repo | None:
            """The repo, when the request's token may write it (else the hub's error is sent)."""
            repo = self._repo(repo_id, self._token())
            if repo is None:
                return None
            account = self._account()
            if account is None:
                self._error(401, "", "Invalid credentials in Authorization header")
            elif not account.may_write(repo_id):
                self._error(403, "", f"You don't have the rights to write to {repo_id}")
            else:
                return repo
            return None

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path != "/api/whoami-v2":
                return super().do_GET()
            hub.requests.append((self.command, path, self._token() is not None))
            account = self._account()
            if account is None:
                return self._error(401, "", "Invalid credentials in Authorization header")
            orgs = [{"name": org, "type": "org"} for org in account.orgs]
            token = {"displayName": "test token", "role": account.role}
            auth = {"type": "access_token", "accessToken": token}
            return self._json({"type": "user", "name": account.name, "orgs": orgs, "auth": auth})

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # a streamed file
                chunks = []
                while size := int(self.rfile.readline().strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_PUT(self) -> None:
            path, body = urlsplit(self.path).path, self._body()
            hub.requests.append((self.command, path, self._token() is not None))
            oid = path.rsplit("/", 1)[1]
            if not path.startswith("/lfs-upload/") or hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "", "the bytes do not match the object id")
            hub.lfs[oid] = body
            return self._json({})

        def do_POST(self) -> None:
            path, body = urlsplit(self.path).path, self._body()
            hub.requests.append((self.command, path, self._token() is not None))
            parts = unquote(path).strip("/").split("/")
            if path == "/api/repos/create":
                self._create(json.loads(body))
            elif path == "/api/validate-yaml":
                self._json({"errors": [], "warnings": []})
            elif path.endswith(".git/info/lfs/objects/batch"):
                self._batch("/".join(parts[:2]).removesuffix(".git"), json.loads(body))
            elif parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "preupload":
                self._preupload("/".join(parts[2:4]), json.loads(body))
            elif parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "commit":
                self._commit("/".join(parts[2:4]), [json.loads(line) for line in body.splitlines() if line])
            else:
                self._error(404, "", f"no such endpoint: POST {path}")

        def _create(self, payload: dict[str, Any]) -> None:
            account = self._account()
            repo_id = f"{payload.get('organization') or (account.name if account else '')}/{payload['name']}"
            if account is None:
                return self._error(401, "", "Invalid credentials in Authorization header")
            if repo_id in hub.repos:
                return self._error(409, "", "You already created this model repo")
            if not account.may_write(repo_id):
                return self._error(403, "", f"You don't have the rights to create a model under {repo_id}")
            files = {".gitattributes": GITATTRIBUTES}
            commit = _commit_id("", files)
            private = payload.get("visibility") == "private"
            hub.repos[repo_id] = Repo(files=files, commit=commit, refs={"main": commit}, private=private)
            return self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _preupload(self, repo_id: str, payload: dict[str, Any]) -> None:
            repo = self._writable(repo_id)
            if repo is None:
                return
            if hub.on_preupload is not None:
                hub.on_preupload()
            answers = []
            for file in payload["files"]:
                path, sample = file["path"], base64.b64decode(file["sample"])
                lfs = path.endswith(LFS_SUFFIXES) or b"\0" in sample or file["size"] > REGULAR_MAX
                there = repo.files.get(path)
                oid = remote_oid(path, there) if there is not None else None
                mode = "lfs" if lfs else "regular"
                answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            self._json({"files": answers})

        def _batch(self, repo_id: str, payload: dict[str, Any]) -> None:
            if self._writable(repo_id) is None:
                return
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in hub.lfs or len(hub.lfs[oid]) != size:
                    answer["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{oid}", "header": {}}}
                objects.append(answer)
            self._json({"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, lines: list[dict[str, Any]]) -> None:
            repo = self._writable(repo_id)
            if repo is None:
                return
            header = next(line["value"] for line in lines if line["key"] == "header")
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                return self._error(503, "", "Service unavailable: try again")
            if header.get("parentCommit") not in (None, repo.commit):
                return self._error(412, "", "A commit has happened since. Please refresh and try again.")
            files, added, deleted = dict(repo.files), [], []
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile" and value["oid"] not in hub.lfs:
                    return self._error(
                        422, "", f"{value['path']}: LFS object {value['oid']} was not uploaded"
                    )
                elif key == "lfsFile":
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif key in ("deletedFile", "deletedFolder"):
                    prefix = value["path"].rstrip("/") + "/"
                    gone = [
                        p
                        for p in files
                        if p == value["path"] or (key == "deletedFolder" and p.startswith(prefix))
                    ]
                    deleted += gone
                    for p in gone:
                        del files[p]
                added += [value["path"]] if key in ("file", "lfsFile") else []
            oid = _commit_id(repo.commit, files)
            repo.push(files, oid)
            hub.commits.append(Commit(repo_id, oid, header["summary"], added, deleted))
            return self._json({"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        def _error(self, status: int, code: str, message: str = "", commit: str | None = None) -> None:
            if code:
                return super()._error(status, code, message, commit)
            body = json.dumps({"error": message}).encode()  # a plain hub error: no X-Error-Code
            self.send_response(status)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return None

    return Handler


def _commit_id(parent: str, files: dict[str, bytes]) -> str:
    """A commit id from its parent and its files (as git's depends on both)."""
    digest = hashlib.sha1(parent.encode())
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()
