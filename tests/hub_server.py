"""A model hub on loopback: the HTTP endpoints huggingface_hub 2.x calls to resolve and download a repo.

Real protocol, real client: the tests point huggingface_hub at it (``HF_ENDPOINT`` in a subprocess, or the
endpoint constants in-process) and sdcluster's staging runs unchanged. Served, as huggingface.co does:

- ``GET /api/models/{repo}[/revision/{rev}]``: model info (``sha``, ``siblings`` with sizes);
- ``GET /api/models/{repo}/tree/{rev}``: the file listing snapshot_download downloads from;
- the same for dataset repos under ``/api/datasets/`` and ``/datasets/{repo}/resolve/``: a dataset repo is
  keyed ``datasets/owner/name`` in the server's ``repos`` (a model and a dataset may share an id);
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: a file, with ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag`` and
  ``X-Linked-Size`` for weights, stored in LFS on the real hub) and ``Content-Length``;
- errors as status + ``X-Error-Code``, the header huggingface_hub maps to its exceptions
  (``utils/_http.py: hf_raise_for_status``): ``RepoNotFound`` (404), ``RevisionNotFound`` (404),
  ``EntryNotFound`` (404), ``GatedRepo`` (401 without a token, 403 with one whose owner has not accepted
  the license).

Every request is logged (method, path, whether it carried a token) so a test can say what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt")


@dataclass
class Repo:
    """One model repo at one commit; ``refs`` maps branch/tag names to it."""

    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    refs: dict[str, str] = field(default_factory=lambda: {"main": "0123456789abcdef0123456789abcdef01234567"})
    gated: bool = False
    accepted_tokens: set[str] = field(default_factory=set)
    private: bool = False  # only its owner's token sees it (tests.hub_upload; the API reports it)
    # sizes the API reports instead of the real ones (a file too big for the disk, without sending it)
    claimed_sizes: dict[str, int] = field(default_factory=dict)
    # earlier commits by id: the hub keeps serving a commit after its branch moved on
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def push(self, files: dict[str, bytes], commit: str, branch: str = "main") -> None:
        """A new commit on ``branch``; the previous one stays reachable by its id."""
        self.history[self.commit] = self.files
        self.files, self.commit, self.refs[branch] = files, commit, commit

    def resolve(self, rev: str) -> str | None:
        if rev == self.commit or rev in self.history:
            return rev
        return self.refs.get(rev)

    def at(self, commit: str) -> Repo:
        """This repo as it was at ``commit`` (a resolved one)."""
        return self if commit == self.commit else replace(self, files=self.history[commit], commit=commit)

    def size(self, path: str) -> int:
        return self.claimed_sizes.get(path, len(self.files[path]))

    def git_oid(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def entry(self, path: str) -> dict[str, Any]:
        """The tree entry of a file; weights are LFS files (their ETag is their sha256)."""
        entry: dict[str, Any] = {
            "type": "file",
            "path": path,
            "size": self.size(path),
            "oid": self.git_oid(path),
        }
        if path.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(self.files[path]).hexdigest()
            entry["lfs"] = {"oid": sha, "size": self.size(path), "pointerSize": 134}
        return entry


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its '/'-separated relative path (a pipeline folder as a repo)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class HubServer:
    """``with HubServer({"org/model": Repo(...)}) as hub: hub.url``; ``hub.requests`` logs every call."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, bool]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class (:mod:`tests.hub_upload` extends it with the upload protocol)."""
        return _handler(self)

    def downloaded(self) -> set[str]:
        """Repo paths whose bytes were sent (GET on resolve), whichever repo and revision."""
        return {
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, path, _ in self.requests
            if m == "GET" and "/resolve/" in path
        }

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: from here on connections are refused, as from a node without the hub."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the test asserts on hub.requests instead
            pass

        def end_headers(self) -> None:
            # one request per connection: a kept-alive connection would outlive close() and keep answering
            self.send_header("Connection", "close")
            super().end_headers()

        def do_HEAD(self) -> None:
            self._route(send_body=False)

        def do_GET(self) -> None:
            self._route(send_body=True)

        def _route(self, send_body: bool) -> None:
            path = urlsplit(self.path).path
            token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None
            hub.requests.append((self.command, path, token is not None))
            if path.startswith("/api/models/"):
                self._api(path[len("/api/models/") :], token)
            elif path.startswith("/api/datasets/"):  # keyed "datasets/owner/name", as its resolve URLs are
                self._api(path[len("/api/datasets/") :], token, prefix="datasets/")
            elif "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                rev, _, file = rest.partition("/")
                self._file(repo_id, unquote(rev), unquote(file), token, send_body)
            else:
                self._error(404, "RepoNotFound")

        def _repo(self, repo_id: str, token: str | None) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            elif repo.gated and token is None:
                self._error(401, "GatedRepo", "Access to this model is restricted: you must be authenticated")
            elif repo.gated and token not in repo.accepted_tokens:
                self._error(403, "GatedRepo", "Access to this model is restricted: accept its conditions")
            else:
                return repo
            return None

        def _api(self, rest: str, token: str | None, prefix: str = "") -> None:
            parts = rest.split("/")
            repo_id, tail = prefix + "/".join(parts[:2]), parts[2:]
            repo = self._repo(repo_id, token)
            if repo is None:
                return
            rev = unquote(tail[1]) if len(tail) >= 2 else "main"
            commit = repo.resolve(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            repo = repo.at(commit)
            if tail and tail[0] == "tree":
                self._json([repo.entry(p) for p in sorted(repo.files)])
            else:
                siblings = [
                    {"rfilename": p, "size": repo.size(p), "blobId": repo.git_oid(p)}
                    for p in sorted(repo.files)
                ]
                self._json(
                    {
                        "id": repo_id.removeprefix(prefix),
                        "modelId": repo_id,
                        "sha": commit,
                        "private": repo.private,
                        "gated": "manual" if repo.gated else False,
                        "siblings": siblings,
                    }
                )

        def _file(self, repo_id: str, rev: str, file: str, token: str | None, send_body: bool) -> None:
            repo = self._repo(repo_id, token)
            if repo is None:
                return
            commit = repo.resolve(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", commit=None)
                return
            repo = repo.at(commit)
            if file not in repo.files:
                self._error(404, "EntryNotFound", f"{file} does not exist", commit=commit)
                return
            data, entry = repo.files[file], repo.entry(file)
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            if "lfs" in entry:
                self.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
                self.send_header("X-Linked-Size", str(entry["size"]))
            self.send_header("ETag", f'"{entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if send_body:
                self.wfile.write(data)

        def _json(self, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str = "", commit: str | None = None) -> None:
            body = json.dumps({"error": message or code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message or code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
