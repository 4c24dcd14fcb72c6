"""push_to_hub against a local fake of the Hub API (FastAPI in a uvicorn thread on 127.0.0.1).

The fake answers just what huggingface_hub 2.4's `create_repo` + `upload_folder` call:
POST /api/repos/create, POST /api/validate-yaml (a README.md in the commit is checked first),
POST /api/models/{repo}/preupload/{rev} (every file "regular", so the
contents travel base64-inlined in the commit and no LFS/xet storage is needed), and
POST /api/models/{repo}/commit/{rev} (NDJSON: a header line, then one line per file).
Anything else is recorded and answered 404, so an unexpected call fails the test loudly.
"""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from trainer.export import push_to_hub

REPO = "someone/tiny-distilled"


class FakeHub:
    def __init__(self):
        self.calls: list[dict] = []
        self.repos: set[str] = set()
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "HEAD", "DELETE"])
        async def handle(path: str, request: Request):
            body = await request.body()
            call = {"method": request.method, "path": "/" + path, "auth": request.headers.get("authorization"),
                    "body": body}
            self.calls.append(call)
            if request.method == "POST" and path == "api/repos/create":
                payload = json.loads(body)
                name = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                if name in self.repos:
                    return JSONResponse({"error": "You already created this model repo", "url": f"{self.url}/{name}"},
                                        status_code=409)
                self.repos.add(name)
                return {"url": f"{self.url}/{name}", "name": name}
            if request.method == "POST" and path == "api/validate-yaml":  # README.md front matter check
                return {"errors": [], "warnings": []}
            if request.method == "POST" and path == f"api/models/{REPO}/preupload/main":
                files = json.loads(body)["files"]
                return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                  for f in files]}
            if request.method == "POST" and path == f"api/models/{REPO}/commit/main":
                oid = "a" * 40
                return {"commitUrl": f"{self.url}/{REPO}/commit/{oid}", "commitOid": oid, "success": True}
            return JSONResponse({"error": f"fake hub: no route {request.method} /{path}"}, status_code=404)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("fake hub did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _folder(tmp_path: Path) -> Path:
    """An export-shaped folder; push_to_hub does not look inside the weights."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 1234)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# card\n")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _commit_files(call: dict) -> dict[str, bytes]:
    lines = [json.loads(line) for line in call["body"].decode().splitlines() if line.strip()]
    assert lines[0]["key"] == "header"
    return {l["value"]["path"]: base64.b64decode(l["value"]["content"]) for l in lines[1:] if l["key"] == "file"}


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch, tmp_path):
    """Never pick up a real token or endpoint from the machine running the tests."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.mark.parametrize("private", [True, False])
def test_push_creates_repo_and_commits_every_file(tmp_path, private):
    folder = _folder(tmp_path)
    with FakeHub() as hub:
        pushed = push_to_hub(folder, REPO, private=private, token="hf_test_token", endpoint=hub.url)
    assert sorted(pushed) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    by_path = {}
    for c in hub.calls:
        by_path.setdefault((c["method"], c["path"]), []).append(c)
    unexpected = [k for k in by_path if k not in {("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                                                  ("POST", f"/api/models/{REPO}/preupload/main"),
                                                  ("POST", f"/api/models/{REPO}/commit/main")}]
    assert not unexpected, unexpected
    (create,) = by_path[("POST", "/api/repos/create")]
    payload = json.loads(create["body"])
    assert payload["name"] == "tiny-distilled" and payload["organization"] == "someone"
    # huggingface_hub 2.x sends private=... as "visibility".
    assert payload["visibility"] == ("private" if private else "public") and payload["type"] == "model"
    assert all(c["auth"] == "Bearer hf_test_token" for c in hub.calls)
    (validate,) = by_path[("POST", "/api/validate-yaml")]
    assert json.loads(validate["body"])["content"] == (folder / "README.md").read_text()
    (commit,) = by_path[("POST", f"/api/models/{REPO}/commit/main")]
    files = _commit_files(commit)
    assert files == {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_to_an_existing_repo_commits_again(tmp_path):
    folder = _folder(tmp_path)
    with FakeHub() as hub:
        push_to_hub(folder, REPO, token="t", endpoint=hub.url)
        push_to_hub(folder, REPO, token="t", endpoint=hub.url)  # create answers 409: exist_ok goes on
    commits = [c for c in hub.calls if c["path"].endswith("/commit/main")]
    assert len(commits) == 2 and _commit_files(commits[1]).keys() == _commit_files(commits[0]).keys()


def test_push_token_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    with FakeHub() as hub:
        push_to_hub(_folder(tmp_path), REPO, endpoint=hub.url)
    assert hub.calls and all(c["auth"] == "Bearer hf_env_token" for c in hub.calls)


def test_dry_run_contacts_nothing_and_lists_files(tmp_path, capsys):
    folder = _folder(tmp_path)
    with FakeHub() as hub:
        listed = push_to_hub(folder, REPO, dry_run=True, endpoint=hub.url)
    assert hub.calls == []
    assert sorted(listed) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    out = capsys.readouterr().out
    assert "model.safetensors  1,234 bytes" in out and REPO in out


def test_missing_token_is_a_clear_error(tmp_path):
    with FakeHub() as hub:
        with pytest.raises(PermissionError, match=r"hf auth login.*HF_TOKEN"):
            push_to_hub(_folder(tmp_path), REPO, endpoint=hub.url)
    assert hub.calls == []


def test_push_refuses_a_non_export_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_to_hub(tmp_path, REPO, token="x", dry_run=True)
