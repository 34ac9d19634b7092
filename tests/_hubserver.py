"""A small Hugging Face hub in a thread, speaking the HTTP protocol huggingface_hub uses.

Downloads: ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with the headers
huggingface_hub reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``X-Error-Code``
on a 404), ``GET /api/models/{repo}[/revision/{rev}]``. Uploads: ``POST /api/repos/create``,
``POST /api/models/{repo}/preupload/{rev}`` (every file "regular", so contents travel
inline) and ``POST /api/models/{repo}/commit/{rev}`` (the NDJSON commit payload), and
``POST /api/validate-yaml`` (the model card's front matter must be there). Each
commit gets a 40-hex id; branches point at commits. ``requests`` logs every call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Repo:
    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        self.private = False

    def commit(self, files: dict[str, bytes], branch: str = "main",
               deleted: tuple[str, ...] = ()) -> str:
        parent = self.commits.get(self.refs.get(branch, ""), {})
        tree = {**parent, **files}
        for d in deleted:
            tree.pop(d, None)
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest())
                                             for k, v in tree.items())).encode()
                           + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.tokens_seen: list[str | None] = []
        self.model_cards: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None,
                      head: bool = False) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _json(self, code: int, obj, headers: dict | None = None) -> None:
                self._send(code, json.dumps(obj).encode(),
                           {"Content-Type": "application/json", **(headers or {})})

            def _error(self, code: int, error_code: str, head: bool = False,
                       extra: dict | None = None) -> None:
                self._send(code, b"" if head else json.dumps({"error": error_code}).encode(),
                           {"X-Error-Code": error_code, "X-Error-Message": error_code,
                            **(extra or {})}, head=head)

            def _resolve(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path).lstrip("/")
                parts = path.split("/")
                # {org}/{name}/resolve/{rev}/{file...}
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound", head)
                repo_id, rev, fname = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", head)
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", head)
                data = repo.commits[sha].get(fname)
                if data is None:
                    return self._error(404, "EntryNotFound", head, {"X-Repo-Commit": sha})
                etag = hashlib.sha256(data).hexdigest()
                self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"',
                                       "Content-Type": "application/octet-stream"}, head=head)

            def do_HEAD(self) -> None:
                hub.requests.append(("HEAD", self.path))
                hub.tokens_seen.append(self.headers.get("authorization"))
                self._resolve(head=True)

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                hub.tokens_seen.append(self.headers.get("authorization"))
                path = unquote(urlsplit(self.path).path)
                if path.startswith("/api/models/"):
                    rest = path[len("/api/models/"):].split("/")
                    repo_id = "/".join(rest[:2])
                    rev = rest[3] if len(rest) > 3 and rest[2] == "revision" else "main"
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound")
                    sha = repo.resolve(rev)
                    if sha is None:
                        return self._error(404, "RevisionNotFound")
                    return self._json(200, {
                        "id": repo_id, "modelId": repo_id, "sha": sha,
                        "private": repo.private,
                        "siblings": [{"rfilename": f} for f in sorted(repo.commits[sha])]})
                self._resolve(head=False)

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path))
                hub.tokens_seen.append(self.headers.get("authorization"))
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                path = unquote(urlsplit(self.path).path)
                if path == "/api/repos/create":
                    req = json.loads(body or b"{}")
                    repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
                    if repo_id in hub.repos:
                        return self._json(409, {"error": "You already created this model repo",
                                                "url": f"/{repo_id}"})
                    repo = hub.repos[repo_id] = Repo()
                    repo.private = req.get("visibility") == "private" or bool(req.get("private"))
                    repo.commit({".gitattributes": b"*.safetensors filter=lfs\n"})
                    return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}",
                                            "name": repo_id})
                if path == "/api/validate-yaml":  # the model card's front matter
                    content = json.loads(body or b"{}").get("content", "")
                    ok = content.startswith("---\n") and "\n---\n" in content[4:]
                    hub.model_cards.append(content)
                    return self._json(200 if ok else 400, {"warnings": [], "errors": [] if ok
                                                           else [{"message": "no metadata"}]})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    req = json.loads(body or b"{}")
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": None} for f in req.get("files", [])]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo_id, rev = path[len("/api/models/"):].split("/commit/")
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound")
                    files: dict[str, bytes] = {}
                    deleted = []
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            files[v["path"]] = base64.b64decode(v["content"]) if \
                                v.get("encoding") == "base64" else v["content"].encode()
                        elif item["key"] == "deletedFile":
                            deleted.append(item["value"]["path"])
                        elif item["key"] == "lfsFile":
                            return self._error(400, "LfsNotServed")
                    sha = repo.commit(files, branch=rev, deleted=tuple(deleted))
                    return self._json(200, {
                        "success": True, "commitOid": sha,
                        "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}"})
                self._error(404, "EntryNotFound")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_folder(self, repo_id: str, folder: str | Path, branch: str = "main") -> str:
        """Commit every file of ``folder`` to ``repo_id`` (created when new)."""
        repo = self.repos.setdefault(repo_id, Repo())
        files = {str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        return repo.commit(files, branch=branch)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
