"""A small Hugging Face Hub look-alike on 127.0.0.1 for offline tests of pushing and loading.

It implements the endpoints `huggingface_hub` (2.x) calls for `create_repo`, `create_commit` (`/api/validate-yaml`
for README.md, `preupload`, `commit`), `list_repo_files` / `list_repo_tree`, `repo_info` / `model_info`,
`snapshot_download` and `hf_hub_download` (`HEAD` / `GET .../resolve/...`, the bytes sent counted per file), with the
headers the client reads
(`X-Repo-Commit`, `ETag`, `X-Error-Code`), plus the (empty) agent-harness registry the client fetches for its
user agent. Every file is declared a "regular" upload in `preupload`, so commits carry
the contents inline (no LFS / Xet transfer). Repos live in memory; commits, requests and authorization headers are
recorded for the tests. It only ever binds 127.0.0.1.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


REPO = r"(?P<repo>[^/]+/[^/]+)"
REVISION = r"(?P<revision>[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    added: list[str]
    deleted: list[str]
    authorization: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40


class FakeHub:
    """`with FakeHub() as hub:` serves at `hub.url`; `hub.repos[repo_id].files` holds the committed files."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self.created: list[dict] = []  # create_repo payloads
        self.served: dict[tuple[str, str], int] = {}  # (repo id, path) -> bytes of file contents sent
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ----------------------------------------------------------------------------------------- repository logic
    def _repo(self, repo_id: str, revision: str | None = None) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is not None and revision is not None and revision not in ("main", repo.sha):
            return None
        return repo

    def create_repo(self, payload: dict) -> tuple[int, dict]:
        name, organization = payload.get("name"), payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else f"user/{name}"
        with self._lock:
            self.created.append(payload)
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def commit(self, repo: Repo, body: bytes, authorization: str | None) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added, deleted = {}, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return 422, {"error": f"unsupported encoding {value.get('encoding')}"}
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key != "header":
                return 422, {"error": f"this fake Hub takes inline files only, got {key!r}"}
        with self._lock:
            for path in deleted:
                for existing in [p for p in repo.files if p == path or p.startswith(path.rstrip("/") + "/")]:
                    del repo.files[existing]
            repo.files.update(added)
            oid = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{sorted(added)}".encode()).hexdigest()
            repo.commits.append(Commit(oid, header["summary"], sorted(added), sorted(deleted), authorization))
        return 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def tree(self, repo: Repo, path: str, recursive: bool) -> list[dict] | None:
        base = path.strip("/") + "/" if path.strip("/") else ""
        under = {p: data for p, data in repo.files.items() if p.startswith(base)}
        if base and not under:
            return None
        files, folders = [], set()
        for file_path, data in sorted(under.items()):
            rest = file_path[len(base) :].split("/")
            folders.update(base + "/".join(rest[:depth]) for depth in range(1, len(rest)) if recursive or depth == 1)
            if recursive or len(rest) == 1:
                files.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": file_path})
        directories = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": folder} for folder in sorted(folders)]
        return directories + files

    def info(self, repo: Repo) -> dict:
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(repo.files)],
        }


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # ----------------------------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, body=True):
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _not_found(self, code: str, message: str, body=True, headers: dict | None = None):
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
        self._send(404, {"error": message}, headers=headers, body=body)

    def _route(self, method: str):
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        hub = self.hub
        with hub._lock:
            hub.requests.append((method, path))
            hub.authorizations.append(self.headers.get("Authorization"))
        body = self._body() if method in ("POST", "PUT") else b""
        head = method == "HEAD"

        if method == "POST" and path == "/api/repos/create":
            status, payload = hub.create_repo(json.loads(body or b"{}"))
            return self._send(status, payload)
        if method == "GET" and path == "/api/whoami-v2":  # the converters check the login before converting
            if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            return self._send(
                200,
                {
                    "type": "user",
                    "name": "me",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                },
            )
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's user-agent telemetry registry
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))

        match = re.fullmatch(rf"/api/models/{REPO}(?:/revision/{REVISION})?", path)
        if match and method == "GET":
            repo = hub._repo(match["repo"], match["revision"])
            if repo is None:
                return self._not_found(
                    "RepoNotFound" if match["repo"] not in hub.repos else "RevisionNotFound",
                    "Repository or revision not found",
                )
            return self._send(200, hub.info(repo))

        match = re.fullmatch(rf"/api/models/{REPO}/tree/{REVISION}(?P<sub>/.*)?", path)
        if match and method == "GET":
            repo = hub._repo(match["repo"], match["revision"])
            if repo is None:
                return self._not_found("RepoNotFound", "Repository not found")
            entries = hub.tree(repo, match["sub"] or "", query.get("recursive", ["false"])[0] in ("1", "true", "True"))
            if entries is None:
                return self._not_found("EntryNotFound", f"{match['sub']} does not exist on {match['revision']}")
            return self._send(200, entries)

        match = re.fullmatch(rf"/api/models/{REPO}/preupload/{REVISION}", path)
        if match and method == "POST":
            repo = hub._repo(match["repo"])
            if repo is None:
                return self._not_found("RepoNotFound", "Repository not found")
            files = json.loads(body)["files"]
            return self._send(
                200,
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_sha1(repo.files[f["path"]]) if f["path"] in repo.files else None,
                        }
                        for f in files
                    ]
                },
            )

        match = re.fullmatch(rf"/api/models/{REPO}/commit/{REVISION}", path)
        if match and method == "POST":
            repo = hub._repo(match["repo"])
            if repo is None:
                return self._not_found("RepoNotFound", "Repository not found")
            status, payload = hub.commit(repo, body, self.headers.get("Authorization"))
            return self._send(status, payload)

        match = re.fullmatch(rf"/{REPO}/resolve/{REVISION}/(?P<file>.+)", path)
        if match and method in ("GET", "HEAD"):
            repo = hub._repo(match["repo"])
            if repo is None:
                return self._not_found("RepoNotFound", "Repository not found", body=not head)
            if match["revision"] not in ("main", repo.sha):
                return self._not_found("RevisionNotFound", "Revision not found", body=not head)
            data = repo.files.get(match["file"])
            if data is None:
                return self._not_found(
                    "EntryNotFound", f"{match['file']} not found", body=not head, headers={"X-Repo-Commit": repo.sha}
                )
            etag = f'"{git_blob_sha1(data)}"'
            if not head:
                with hub._lock:
                    key = (repo.repo_id, match["file"])
                    hub.served[key] = hub.served.get(key, 0) + len(data)
            return self._send(200, raw=data, headers={"X-Repo-Commit": repo.sha, "ETag": etag}, body=not head)

        with hub._lock:
            hub.unhandled.append((method, path))
        return self._send(501, {"error": f"fake Hub does not implement {method} {path}"}, body=not head)

    def _validate_yaml(self, payload: dict):
        from huggingface_hub import ModelCard

        try:
            card = ModelCard(payload.get("content", ""), ignore_metadata_errors=False)
        except Exception as error:  # what the Hub reports as a 400 with errors
            return self._send(400, {"errors": [{"message": str(error)}], "warnings": []})
        warnings = [] if card.data.to_dict() else [{"message": "empty or missing yaml metadata in repo card"}]
        return self._send(200, {"errors": [], "warnings": warnings})

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")
