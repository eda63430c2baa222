"""A tiny stand-in for the Hugging Face Hub's write API on 127.0.0.1, to test pushes without internet.

It answers the calls huggingface_hub 2.4 makes for `create_repo` + `upload_folder` (read from its source:
`HfApi.create_repo`, `HfApi._validate_yaml`, `_commit_api._fetch_upload_modes`, `_commit_api._send_commit`):

    POST /api/repos/create                      -> {"url": ...}; 409 when the repo exists (exist_ok=True accepts it)
    POST /api/validate-yaml                     -> the README's metadata must parse; base_model_relation is checked
    POST /api/models/{repo}/preupload/{rev}     -> every file "regular", so contents travel inline in the commit
    POST /api/models/{repo}/commit/{rev}        -> NDJSON: a header, then base64 files; stored in `repos`

Answering "regular" keeps the client off the LFS / Xet transfer protocols, which only move bytes and are not what
these tests check (which files arrive, and what the card says). Anything else gets a 404 and lands in `unexpected`.
Bounded: at most `max_requests` requests are served, and the server stops itself after `lifetime` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from huggingface_hub import ModelCard

# The values https://huggingface.co/docs/hub/model-cards#specifying-a-base-model lists for base_model_relation.
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_CALL = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<call>preupload|commit)/(?P<revision>[^/]+)$")


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.endpoint`; `hub.repos[repo_id][path]` holds the committed bytes."""

    def __init__(self, max_requests: int = 50, lifetime: float = 300.0, namespace: str = "user"):
        self.max_requests = max_requests
        self.namespace = namespace  # owner of repos created without an organization
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.unexpected: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    # ---- the Hub's answers --------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or self.namespace}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[repo_id] = {}
            return 200, {"url": f"{self.endpoint}/{repo_id}"}
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        match = _REPO_CALL.match(path)
        if method != "POST" or match is None:
            self.unexpected.append((method, path))
            return 404, {"error": f"The fake Hub does not serve {method} {path}"}
        repo_id = unquote(match["repo"])
        if repo_id not in self.repos:
            return 404, {"error": f"Repository {repo_id} not found"}
        if match["call"] == "preupload":
            paths = [f["path"] for f in json.loads(body)["files"]]
            regular = {"uploadMode": "regular", "shouldIgnore": False, "oid": None}
            return 200, {"files": [{"path": path, **regular} for path in paths]}
        return self._commit(repo_id, body)

    def _validate_yaml(self, content: str) -> tuple[int, dict[str, Any]]:
        """The card's metadata must parse, and a `base_model_relation` must be one of the Hub's documented values."""
        try:
            meta = ModelCard(content).data.to_dict()
        except ValueError as err:
            return 400, {"errors": [{"message": str(err)}]}
        relation = meta.get("base_model_relation")
        if relation is not None and (relation not in BASE_MODEL_RELATIONS or "base_model" not in meta):
            return 400, {"errors": [{"message": f"base_model_relation {relation!r} needs a base_model and one of "
                                                f"{BASE_MODEL_RELATIONS}"}]}
        return 200, {"errors": [], "warnings": []}

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, dict[str, Any]]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = self.repos[repo_id]
        oid = hashlib.sha1(body).hexdigest()
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                self.commits.append({"repo_id": repo_id, "oid": oid, **value})
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return 400, {"error": f"The fake Hub does not accept commit entries of kind {key!r}"}
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                path = urlsplit(self.path).path
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Authorization")))
                    if len(hub.requests) > hub.max_requests:
                        status, answer = 400, {"error": "request limit of the fake Hub reached"}
                        threading.Thread(target=hub.stop, daemon=True).start()
                    else:
                        status, answer = hub.handle(self.command, path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        return Handler
