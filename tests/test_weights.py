"""weights.py against loopback HTTP servers through fake manifests: a plain host (pooch: digest match and mismatch,
retries, fallback URLs) and the Hugging Face hub's answers (huggingface_hub: pinned revisions, a download cut off and
resumed with HTTP Range in one run and the next, gated repositories and tokens, the LFS digest, HF_ENDPOINT, offline),
files already present, the settings-driven mode and the command line. Nothing here leaves 127.0.0.1."""

from __future__ import annotations

import gc
import hashlib
import json
import re
import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from servers import LoopbackServer

import weights
from config import SEGMENTERS, Settings

ROOT = Path(__file__).resolve().parent.parent
FAST = {"progress": False, "attempts": 2}

# A socket left open (say, an HTTP error's response never closed) is an error here: Python's ResourceWarning when it
# collects the socket fails the test during which that happens. collect_garbage makes that the test that leaked it
# or the next one (the log capture keeps a test's records, and what they name, until its teardown is over).
pytestmark = [pytest.mark.filterwarnings("error::ResourceWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture(autouse=True)
def collect_garbage():
    gc.collect()
    yield
    gc.collect()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer(LoopbackServer):
    """Serves `files` (URL path -> bytes) on 127.0.0.1, honouring single `Range: bytes=N-` requests with 206.

    `drops[path] = n`: the next n answers for that path announce the full Content-Length, send half of the body
    and close the connection. `errors[path] = [status, ...]`: the next answers are those HTTP errors.
    `ranges = False`: Range is ignored (200 and the whole file). Every request is recorded as (path, Range)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.drops, self.errors, self.ranges, self.requests = files, {}, {}, True, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.record(self)
                if server.errors.get(self.path):
                    self.send_error(server.errors[self.path].pop(0))
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.ranges:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                if server.drops.get(self.path, 0) > 0:
                    server.drops[self.path] -= 1
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(rest)

            def log_message(self, *args):
                pass

        super().__init__(Handler, poll_interval=0.05)

    def record(self, request: BaseHTTPRequestHandler) -> None:
        self.requests.append((request.path, request.headers.get("Range")))


BIG = bytes(range(256)) * 4000  # 1,024,000 bytes: several read chunks
SMALL = b"a small fake checkpoint\n" * 10


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    with FileServer({"/big.pth": BIG, "/small.pt": SMALL, "/bert/config.json": b'{"model_type": "bert"}',
                     "/bert/vocab.txt": b"[PAD]\n[UNK]\n"}) as s:
        yield s


def entry(server, name="big.pth", url_path="/big.pth", data=BIG, digest=None, size=None, urls=None):
    return {"files": [{"path": name, "urls": urls or [server.url + url_path], "size": size,
                       "sha256": sha(data) if digest is None else digest}]}


def test_downloads_verifies_and_moves_into_place(server, tmp_path):
    manifest = {"big.pth": entry(server, size=len(BIG))}
    [path] = weights.fetch_entry("big.pth", tmp_path, manifest, **FAST)
    assert path == tmp_path / "big.pth" and path.read_bytes() == BIG
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.pth", weights.STAMP])  # no temporary file left
    stamp = json.loads((tmp_path / weights.STAMP).read_text())
    assert stamp["big.pth"]["sha256"] == sha(BIG) and stamp["big.pth"]["size"] == len(BIG)
    assert server.requests == [("/big.pth", None)]


def test_digest_mismatch_deletes_the_download_and_says_why(server, tmp_path):
    manifest = {"big.pth": entry(server, digest="0" * 64)}
    with pytest.raises(weights.ChecksumError) as error:
        weights.fetch_entry("big.pth", tmp_path, manifest, variable="GROUNDINGDINO_CHECKPOINT", **FAST)
    message = str(error.value)
    assert f"is not the published one (its sha256 is not {'0' * 64}, in 2 attempts); it was deleted" in message
    assert "GROUNDINGDINO_CHECKPOINT=" in message and server.url + "/big.pth" in message
    assert list(tmp_path.iterdir()) == [] and len(server.requests) == 2  # tried again, then nothing kept


def test_size_mismatch_is_refused_before_hashing_again(server, tmp_path, monkeypatch):
    manifest = {"small.pt": entry(server, "small.pt", "/small.pt", SMALL, size=len(SMALL) + 1)}
    monkeypatch.setattr(weights, "sha256_of", lambda path: pytest.fail("hashed a file of the wrong size"))
    with pytest.raises(weights.ChecksumError, match=f"size {len(SMALL)} bytes, expected {len(SMALL) + 1}"):
        weights.fetch_entry("small.pt", tmp_path, manifest, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_connection_is_tried_again(server, tmp_path):
    server.drops["/big.pth"] = 1
    [path] = weights.fetch_entry("big.pth", tmp_path, {"big.pth": entry(server)}, **FAST)
    assert path.read_bytes() == BIG
    assert server.requests == [("/big.pth", None), ("/big.pth", None)]  # pooch starts again: no Range
    server.drops["/small.pt"] = 2
    with pytest.raises(weights.DownloadError, match="could not download it"):
        weights.fetch_entry("small.pt", tmp_path, {"small.pt": entry(server, "small.pt", "/small.pt", SMALL)},
                            **FAST)
    assert not (tmp_path / "small.pt").exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "big.pth", weights.STAMP])


def test_present_and_valid_files_are_skipped_and_remembered(server, tmp_path, monkeypatch):
    manifest = {"big.pth": entry(server, size=len(BIG))}
    (tmp_path / "big.pth").write_bytes(BIG)
    weights.fetch_entry("big.pth", tmp_path, manifest, **FAST)
    assert server.requests == []
    # The second check trusts the stamp (same size and mtime): no hashing of a multi-GB file on every start.
    monkeypatch.setattr(weights, "sha256_of", lambda path: pytest.fail("hashed again"))
    weights.fetch_entry("big.pth", tmp_path, manifest, **FAST)
    assert server.requests == []


def test_a_present_file_that_differs_is_an_error_and_is_kept(server, tmp_path):
    (tmp_path / "big.pth").write_bytes(b"my own fine-tuned checkpoint")
    with pytest.raises(weights.ChecksumError) as error:
        weights.fetch_entry("big.pth", tmp_path, {"big.pth": entry(server)}, variable="SAM_CHECKPOINT", **FAST)
    assert "SAM_CHECKPOINT=" in str(error.value) and "left in place" in str(error.value)
    assert (tmp_path / "big.pth").read_bytes() == b"my own fine-tuned checkpoint" and server.requests == []


def test_a_modified_file_is_hashed_again_despite_its_stamp(server, tmp_path):
    manifest = {"small.pt": entry(server, "small.pt", "/small.pt", SMALL)}
    [path] = weights.fetch_entry("small.pt", tmp_path, manifest, **FAST)
    path.write_bytes(SMALL.upper())  # same size, new mtime
    with pytest.raises(weights.ChecksumError):
        weights.fetch_entry("small.pt", tmp_path, manifest, **FAST)


def test_unverified_entries_download_with_a_warning(server, tmp_path, caplog):
    manifest = {"small.pt": {"files": [{"path": "small.pt", "urls": [server.url + "/small.pt"], "sha256": None}]}}
    with caplog.at_level("WARNING", logger="weights"):
        [path] = weights.fetch_entry("small.pt", tmp_path, manifest, **FAST)
    assert path.read_bytes() == SMALL
    assert f"NOT VERIFIED (the manifest has no digest for it); its sha256 is {sha(SMALL)}" in caplog.text


def test_falls_back_to_the_next_url(server, tmp_path):
    manifest = {"small.pt": entry(server, "small.pt", data=SMALL,
                                  urls=[server.url + "/missing.pt", server.url + "/small.pt"])}
    [path] = weights.fetch_entry("small.pt", tmp_path, manifest, attempts=1, progress=False)
    assert path.read_bytes() == SMALL
    assert [p for p, _ in server.requests] == ["/missing.pt", "/small.pt"]


def test_server_errors_are_retried_and_every_url_is_named(server, tmp_path):
    server.errors["/small.pt"] = [503, 502]
    manifest = {"small.pt": entry(server, "small.pt", "/small.pt", SMALL)}
    weights.fetch_entry("small.pt", tmp_path, manifest, attempts=3, progress=False)
    assert len(server.requests) == 3
    manifest = {"gone.pt": entry(server, "gone.pt", "/gone.pt", SMALL, urls=[server.url + "/gone.pt",
                                                                             server.url + "/also-gone.pt"])}
    with pytest.raises(weights.DownloadError) as error:
        weights.fetch_entry("gone.pt", tmp_path, manifest, variable="MOBILESAM_CHECKPOINT", attempts=1,
                            progress=False)
    assert "404" in str(error.value) and "/gone.pt" in str(error.value) and "/also-gone.pt" in str(error.value)
    assert "set MOBILESAM_CHECKPOINT" in str(error.value)


def open_sockets_to(server) -> list[socket.socket]:
    """Client sockets of this process still open to `server` (live objects: a leak shows before any collection)."""
    found = []
    for obj in gc.get_objects():
        if type(obj) is socket.socket and obj.fileno() != -1:  # type(): isinstance() wakes torch's deprecated names
            try:
                peer = obj.getpeername()
            except OSError:  # not connected (a listening socket)
                continue
            if peer[:2] == ("127.0.0.1", server.port):
                found.append(obj)
    return found


def test_error_responses_are_closed(server, tmp_path):
    server.errors["/small.pt"] = [503]
    weights.fetch_entry("small.pt", tmp_path, {"small.pt": entry(server, "small.pt", "/small.pt", SMALL)}, **FAST)
    with pytest.raises(weights.DownloadError, match="404"):
        weights.fetch_entry("gone.pt", tmp_path, {"gone.pt": entry(server, "gone.pt", "/gone.pt", SMALL)}, **FAST)
    assert len(server.requests) == 4
    assert open_sockets_to(server) == []


def test_a_directory_entry_fetches_each_file(server, tmp_path):
    manifest = {"bert": {"files": [
        {"path": "bert/config.json", "urls": [server.url + "/bert/config.json"],
         "sha256": sha(server.files["/bert/config.json"])},
        {"path": "bert/vocab.txt", "urls": [server.url + "/bert/vocab.txt"],
         "sha256": sha(server.files["/bert/vocab.txt"]), "size": len(server.files["/bert/vocab.txt"])},
    ]}}
    paths = weights.fetch_entry("bert", tmp_path, manifest, **FAST)
    assert paths == [tmp_path / "bert/config.json", tmp_path / "bert/vocab.txt"]
    assert (tmp_path / "bert" / weights.STAMP).exists()


def test_progress_goes_to_stderr(server, tmp_path, capfd):
    weights.fetch_entry("big.pth", tmp_path, {"big.pth": entry(server)}, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "100%" in err  # pooch's progress bar


def test_unknown_names_and_bad_manifests_are_refused(tmp_path):
    with pytest.raises(weights.DownloadError, match="unknown name 'nope'"):
        weights.fetch_entry("nope", tmp_path, {"a": {"files": [{"path": "a", "urls": ["http://x/a"]}]}})
    hub = {"repo": "org/repo", "revision": "0" * 40, "file": "a"}
    bad = [
        {},
        {"a": {"files": []}},
        {"a": {"files": [{"path": "../a", "urls": ["http://x/a"]}]}},
        {"a": {"files": [{"path": "/abs", "urls": ["http://x/a"]}]}},
        {"a": {"files": [{"path": "a", "urls": []}]}},
        {"a": {"files": [{"path": "a", "urls": ["http://x/a"], "sha256": "ABC"}]}},
        {"a": {"files": [{"path": "a", "urls": ["http://x/a"], "size": -1}]}},
        {"a": {"files": [{"path": "a", "hub": {**hub, "revision": ""}}]}},
        {"a": {"files": [{"path": "a", "urls": ["http://x/a"], "gated": "https://huggingface.co/org/repo"}]}},
        {"a": {"files": [{"path": "a", "hub": hub, "gated": "http://huggingface.co/org/repo"}]}},
    ]
    for manifest in bad:
        with pytest.raises(weights.DownloadError, match="manifest"):
            weights.validate_manifest(manifest)
    assert weights.validate_manifest({"a": {"files": [{"path": "a", "hub": hub}]}})


# ---------------------------------------------------------------------------------------------- settings mode

def fake_manifest(server) -> dict:
    """The real manifest's names, the fake server's files."""
    return {
        "groundingdino_swint_ogc.pth": entry(server, "groundingdino_swint_ogc.pth", "/big.pth", BIG),
        "mobile_sam.pt": entry(server, "mobile_sam.pt", "/small.pt", SMALL),
        "sam_vit_b_01ec64.pth": entry(server, "sam_vit_b_01ec64.pth", "/small.pt", SMALL),
        "bert-base-uncased": {"files": [
            {"path": "bert-base-uncased/config.json", "urls": [server.url + "/bert/config.json"],
             "sha256": sha(server.files["/bert/config.json"])},
            {"path": "bert-base-uncased/vocab.txt", "urls": [server.url + "/bert/vocab.txt"],
             "sha256": sha(server.files["/bert/vocab.txt"])},
        ]},
    }


def test_ensure_fetches_what_the_settings_need(server, tmp_path):
    models = tmp_path / "models"
    settings = Settings.from_env({"MODEL_DIR": str(models)})
    assert settings.groundingdino_text_encoder == str(models / "bert-base-uncased")  # a directory by default
    paths = weights.ensure(settings, fake_manifest(server), **FAST)
    assert sorted(p.relative_to(models).as_posix() for p in paths) == [
        "bert-base-uncased/config.json", "bert-base-uncased/vocab.txt", "groundingdino_swint_ogc.pth",
        "mobile_sam.pt"]
    assert not (models / "sam_vit_b_01ec64.pth").exists()  # not needed with MobileSAM
    server.requests.clear()
    weights.ensure(settings, fake_manifest(server), **FAST)  # second start: nothing to fetch
    assert server.requests == []


def test_ensure_follows_use_sam_and_a_hub_text_encoder_needs_nothing(server, tmp_path):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "USE_SAM": "true", "SAM_MODEL_TYPE": "vit_b",
                                  "GROUNDINGDINO_TEXT_ENCODER": "bert-base-uncased"})  # a hub id: transformers' cache
    paths = weights.ensure(settings, fake_manifest(server), **FAST)
    assert sorted(p.name for p in paths) == ["groundingdino_swint_ogc.pth", "sam_vit_b_01ec64.pth"]


def test_ensure_accepts_your_own_files_and_names_the_variable_when_missing(server, tmp_path):
    own = tmp_path / "my_finetuned_dino.pth"
    env = {"MODEL_DIR": str(tmp_path), "GROUNDINGDINO_CHECKPOINT": str(own), "USE_MOBILE_SAM": "false",
           "GROUNDINGDINO_TEXT_ENCODER": "bert-base-uncased"}
    with pytest.raises(weights.DownloadError, match=f"GROUNDINGDINO_CHECKPOINT={own}: file not found"):
        weights.ensure(Settings.from_env(env), fake_manifest(server), **FAST)
    own.write_bytes(b"mine")
    assert weights.ensure(Settings.from_env(env), fake_manifest(server), **FAST) == []
    assert server.requests == []


# ---------------------------------------------------------------------------------------------- command line

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "weights.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def test_command_line_named_entries_and_errors(server, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(fake_manifest(server)))
    target = tmp_path / "models"
    # The Docker build runs it next to nothing else (its layer must not depend on config.py): a lone copy here.
    alone = tmp_path / "build" / "weights.py"
    alone.parent.mkdir()
    alone.write_bytes((ROOT / "weights.py").read_bytes())
    done = subprocess.run([sys.executable, str(alone), "--manifest", str(manifest), "--dir", str(target),
                           "mobile_sam.pt", "bert-base-uncased"], cwd=alone.parent, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert (target / "mobile_sam.pt").read_bytes() == SMALL
    assert (target / "bert-base-uncased" / "vocab.txt").exists()

    unknown = run_cli("--manifest", str(manifest), "--dir", str(target), "nope.pth")
    assert unknown.returncode == 1 and "error: unknown name(s) nope.pth" in unknown.stderr

    data = fake_manifest(server)
    data["mobile_sam.pt"]["files"][0]["sha256"] = "f" * 64
    manifest.write_text(json.dumps(data))
    (target / "mobile_sam.pt").unlink()
    bad = run_cli("--manifest", str(manifest), "--dir", str(target), "--quiet", "mobile_sam.pt")
    assert bad.returncode == 1 and "error:" in bad.stderr and "its sha256 is not " + "f" * 64 in bad.stderr
    assert not (target / "mobile_sam.pt").exists()


def test_command_line_without_names_uses_the_settings(server, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(fake_manifest(server)))
    done = subprocess.run([sys.executable, str(ROOT / "weights.py"), "--manifest", str(manifest), "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        weights.STAMP, "bert-base-uncased", "groundingdino_swint_ogc.pth", "mobile_sam.pt"]  # MODEL_DIR's default


# ---------------------------------------------------------------------------------------------- the real manifest

def test_the_real_manifest_is_pinned_and_verified():
    manifest = weights.load_manifest()
    for name, item in manifest.items():
        for spec in item["files"]:
            hub = spec.get("hub")
            if hub:
                assert Path(hub["file"]).name == Path(spec["path"]).name
                assert re.fullmatch("[0-9a-f]{40}", hub["revision"]), f"{name}: {hub} is not pinned"
            if spec["sha256"] is None:  # only a hub file, verified by the hub's LFS digest
                assert hub and spec["size"] is None, name
            else:
                assert spec["size"], f"{name}: {spec['path']} has no size"
            for url in spec.get("urls", []):
                assert url.startswith("https://"), url
                assert not re.search(r"/(main|master|latest)/", url), f"{url} is not pinned"
    assert manifest["sam3.pt"]["files"][0]["gated"] == "https://huggingface.co/facebook/sam3"
    assert all(item["source"] for item in manifest.values())  # where its digests were read
    unverified = [spec["path"] for item in manifest.values() for spec in item["files"] if spec["sha256"] is None]
    assert unverified == ["sam3.pt"]  # the only one whose digest is asked of the hub
    for file_name in (*SEGMENTERS["sam"].files.values(), *SEGMENTERS["sam2"].files.values(),
                      "groundingdino_swint_ogc.pth", "mobile_sam.pt", "sam3.pt", "bpe_simple_vocab_16e6.txt.gz"):
        assert file_name in manifest, file_name  # every default checkpoint name can be fetched
    settings = Settings()
    for path in (settings.groundingdino_checkpoint, settings.sam_checkpoint, settings.mobilesam_checkpoint):
        assert Path(path).name in manifest
    bert = [spec["path"] for spec in manifest["bert-base-uncased"]["files"]]
    assert {"bert-base-uncased/config.json", "bert-base-uncased/vocab.txt"} <= set(bert)
    assert any(p.endswith(("model.safetensors", "pytorch_model.bin")) for p in bert)
    assert len({spec["hub"]["revision"] for spec in manifest["bert-base-uncased"]["files"]}) == 1


def test_ensure_reports_every_missing_file_at_once(server, tmp_path):
    """Offline (every download fails): one message names each file the settings need, its size and digest, the
    text encoder directory and every file it must hold, the total, and what to do."""
    manifest = fake_manifest(server)
    for entry in manifest.values():
        for spec in entry["files"]:
            spec["urls"] = [url.replace(server.url, "http://127.0.0.1:9") for url in spec["urls"]]  # nothing there
            spec["size"] = len(server.files.get(spec["urls"][0].removeprefix("http://127.0.0.1:9"), SMALL))
    models = tmp_path / "models"
    with pytest.raises(weights.DownloadError) as info:
        weights.ensure(Settings.from_env({"MODEL_DIR": str(models)}), manifest, **FAST)
    message = str(info.value)
    assert message.startswith("4 model file(s) the settings need are missing")
    for variable, path in [("GROUNDINGDINO_CHECKPOINT", "groundingdino_swint_ogc.pth"),
                           ("MOBILESAM_CHECKPOINT", "mobile_sam.pt"),
                           ("GROUNDINGDINO_TEXT_ENCODER", "bert-base-uncased/config.json"),
                           ("GROUNDINGDINO_TEXT_ENCODER", "bert-base-uncased/vocab.txt")]:
        assert f"{models / path} ({variable};" in message
    total = sum(spec.get("size") or 0 for entry in manifest.values() for spec in entry["files"]
                if entry is not manifest["sam_vit_b_01ec64.pth"])
    assert total > 0 and f"sha256 {sha(BIG)}" in message and f"({weights._size(total)} in all)" in message
    assert f"GROUNDINGDINO_TEXT_ENCODER={models / 'bert-base-uncased'} is a directory that must hold: config.json, " \
           "vocab.txt" in message
    assert "python weights.py --list" in message and "Offline: copy each file" in message


def test_the_sam3_tokenizer_entry_is_the_file_open_clip_ships():
    """SAM3_TOKENIZER's default (open_clip_torch's copy, installed from PyPI) is the manifest's file, byte for byte."""
    [spec] = weights.load_manifest()["bpe_simple_vocab_16e6.txt.gz"]["files"]
    packaged = Path(Settings.from_env({}).sam3_tokenizer)
    assert packaged.stat().st_size == spec["size"] and sha(packaged.read_bytes()) == spec["sha256"]


# ---------------------------------------------------------------------------------------------- the hub

SAM3_BYTES = b"pretend sam3 weights\n" * 50_000  # 1,050,000 bytes: several of the hub client's read chunks
COMMIT = "c" * 40


class HubServer(LoopbackServer):
    """The Hugging Face hub's answers, as huggingface_hub reads them: HEAD /REPO/resolve/REV/FILE answers 302 with
    X-Repo-Commit, X-Linked-Etag / X-Linked-Size (the LFS object's sha256 and size: `lfs_digest` to lie) and a
    Location on a second loopback server (`storage`, another host as the hub's CDN is: it serves the bytes, with
    Range, and `drops` answers cut halfway). A gated repository (`gated`) needs "Bearer good": no token 401,
    "Bearer pending" 403 GatedRepo. Records (method, path, Authorization, Range)
    of both."""

    def __init__(self, files: dict[tuple[str, str], bytes], gated: tuple[str, ...] = (),
                 lfs_digest: str | None = None):
        self.files, self.gated, self.lfs_digest, self.requests = files, gated, lfs_digest, []
        self.storage = FileServer({f"/blobs/{sha(data)}": data for data in files.values()})
        self.storage.record = lambda request: self.requests.append(
            ("GET", request.path, request.headers.get("Authorization"), request.headers.get("Range")))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                auth = self.headers.get("Authorization")
                server.requests.append(("HEAD", self.path, auth, None))
                match = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", self.path)
                repo, revision, name = match.groups() if match else ("", "", "")
                if repo in server.gated and auth != "Bearer good":
                    self.send_response(403 if auth == "Bearer pending" else 401)
                    self.send_header("X-Error-Code", "GatedRepo" if auth == "Bearer pending" else "RepoNotFound")
                    self.end_headers()
                    return
                data = server.files.get((repo, name))
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self.send_response(302)
                self.send_header("Location", f"{server.storage.url}/blobs/{sha(data)}")
                self.send_header("X-Repo-Commit", revision if re.fullmatch("[0-9a-f]{40}", revision) else COMMIT)
                self.send_header("X-Linked-Etag", f'"{server.lfs_digest or sha(data)}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(Handler, poll_interval=0.05)

    def start(self):
        self.storage.start()
        return super().start()

    def close(self) -> None:
        super().close()
        self.storage.close()


def hub_offline(monkeypatch, offline: bool) -> None:
    """HF_HUB_OFFLINE as huggingface_hub read it at import; its HTTP sessions, made with it, are made again."""
    import huggingface_hub.constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    reset_sessions()


@pytest.fixture
def hub_at(monkeypatch, tmp_path):
    """huggingface_hub pointed at a HubServer (as HF_ENDPOINT does at its import), online, with an empty cache and
    no token but the one a test gives `weights.hub_token`. Offline again afterwards, as the rest of the tests are."""
    import huggingface_hub.constants
    import huggingface_hub.file_download
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub_offline(monkeypatch, False)
    monkeypatch.setattr(weights, "hub_token", lambda: None)

    def point(server: HubServer) -> HubServer:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        return server
    yield point
    monkeypatch.undo()
    reset_sessions()


def hub_spec(path: str, repo: str = "org/repo", revision: str = "0" * 40, data: bytes | None = SAM3_BYTES,
             **more) -> dict:
    """A hub file spec: verified by `data`'s digest (None: by the hub's LFS digest)."""
    return {"path": path, "hub": {"repo": repo, "revision": revision, "file": Path(path).name},
            "size": None if data is None else len(data), "sha256": None if data is None else sha(data), **more}


def test_a_hub_file_comes_through_hf_hub_download_at_its_revision(hub_at, tmp_path):
    with hub_at(HubServer({("org/repo", "big.pth"): BIG})) as hub:
        [path] = weights.fetch_entry("big", tmp_path, {"big": {"files": [hub_spec("big.pth", data=BIG)]}}, **FAST)
    assert path == tmp_path / "big.pth" and path.read_bytes() == BIG
    assert json.loads((tmp_path / weights.STAMP).read_text())["big.pth"]["sha256"] == sha(BIG)
    assert [(m, p) for m, p, _, _ in hub.requests] == [("HEAD", f"/org/repo/resolve/{'0' * 40}/big.pth"),
                                                    ("GET", f"/blobs/{sha(BIG)}")]


def test_a_hub_download_cut_off_resumes_where_it_stopped_in_this_run_and_the_next(hub_at, tmp_path):
    """huggingface_hub writes what it received in 10 MiB blocks to an .incomplete file and resumes from there."""
    data = bytes(range(256)) * (21 * 4096)  # 21 MiB, cut off halfway: one whole block kept
    manifest = {"big.pth": {"files": [hub_spec("big.pth", data=data)]}}
    resumed = f"bytes={10 * 2**20}-"
    with hub_at(HubServer({("org/repo", "big.pth"): data})) as hub:
        hub.storage.drops[f"/blobs/{sha(data)}"] = 1
        [path] = weights.fetch_entry("big.pth", tmp_path, manifest, **FAST)
        assert path.read_bytes() == data
        assert [r for m, *_, r in hub.requests if m == "GET"] == [None, resumed]

        path.unlink()
        (tmp_path / weights.STAMP).unlink()
        hub.requests.clear()
        hub.storage.drops[f"/blobs/{sha(data)}"] = 1
        with pytest.raises(weights.DownloadError, match="could not download it"):
            weights.fetch_entry("big.pth", tmp_path, manifest, attempts=1, progress=False)
        assert not path.exists()
        [path] = weights.fetch_entry("big.pth", tmp_path, manifest, **FAST)  # the next run
    assert path.read_bytes() == data
    assert [r for m, *_, r in hub.requests if m == "GET"] == [None, resumed]


def test_a_hub_without_the_file_falls_back_to_the_plain_url_with_the_same_digest(hub_at, server, tmp_path):
    """A mirror (HF_ENDPOINT) that lacks the file answers 404: the plain host's copy, checked against the same digest.
    (A hub that can't be reached at all is the same, after huggingface_hub's own 5 tries over 23 s.)"""
    spec = hub_spec("big.pth", data=BIG, urls=[server.url + "/big.pth"])
    with hub_at(HubServer({})) as hub:
        [path] = weights.fetch_entry("big", tmp_path, {"big": {"files": [spec]}}, **FAST)
    assert path.read_bytes() == BIG and server.requests == [("/big.pth", None)]
    assert [(m, p) for m, p, *_ in hub.requests] == [("HEAD", f"/org/repo/resolve/{'0' * 40}/big.pth")]


def test_offline_a_verified_file_is_used_and_a_missing_one_is_named(hub_at, tmp_path, monkeypatch):
    manifest = {"sam3.pt": {"files": [hub_spec("sam3.pt", data=None)]}}  # verified by the hub's digest
    with hub_at(HubServer({("org/repo", "sam3.pt"): SAM3_BYTES})):
        [path] = weights.fetch_entry("sam3.pt", tmp_path, manifest, **FAST)
    hub_offline(monkeypatch, True)  # HF_HUB_OFFLINE=1, the server gone
    assert weights.fetch_entry("sam3.pt", tmp_path, manifest, **FAST) == [path]
    with pytest.raises(weights.DownloadError, match="offline mode is enabled"):
        weights.fetch_entry("sam3.pt", tmp_path / "elsewhere", manifest, **FAST)


def gated_manifest(**more) -> dict:
    return {"sam3.pt": {"files": [hub_spec("sam3.pt", data=None, gated="https://huggingface.co/org/repo", **more)]}}


@pytest.mark.parametrize("token, message", [
    (None, "https://huggingface.co/org/repo is gated: accept its license there with your Hugging Face account, "
           "then set HF_TOKEN to a read token"),
    ("bad", "the hub did not accept the token (HTTP 401): set HF_TOKEN to a valid read token"),
    ("pending", "HTTP 403: the token's account has no access to https://huggingface.co/org/repo (yet): accept the "
                "license there"),
])
def test_a_gated_file_without_access_says_in_one_line_what_to_do(hub_at, tmp_path, monkeypatch, token, message):
    monkeypatch.setattr(weights, "hub_token", lambda: token)
    with hub_at(HubServer({("org/repo", "sam3.pt"): SAM3_BYTES}, gated=("org/repo",))):
        with pytest.raises(weights.GatedError) as error:
            weights.fetch_entry("sam3.pt", tmp_path, gated_manifest(), variable="SAM3_CHECKPOINT", **FAST)
        assert weights.main(["--dir", str(tmp_path), "sam3.pt", "--quiet", "--manifest", str(
            _write(tmp_path / "m.json", gated_manifest()))]) == 1  # the command line: `error: ...`, no traceback
    text = str(error.value)
    assert text.startswith(f"SAM3_CHECKPOINT={tmp_path / 'sam3.pt'}: ") and message in text and "\n" not in text
    assert not (tmp_path / "sam3.pt").exists()


def _write(path: Path, manifest: dict) -> Path:
    path.write_text(json.dumps(manifest))
    return path


def test_a_gated_file_is_verified_against_the_hubs_lfs_digest_and_the_token_stays_on_the_hub(hub_at, tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setattr(weights, "hub_token", lambda: "good")
    with hub_at(HubServer({("org/repo", "sam3.pt"): SAM3_BYTES}, gated=("org/repo",))) as hub:
        [path] = weights.fetch_entry("sam3.pt", tmp_path, gated_manifest(), **FAST)
    assert path.read_bytes() == SAM3_BYTES
    assert json.loads((tmp_path / weights.STAMP).read_text())["sam3.pt"]["sha256"] == sha(SAM3_BYTES)
    # The token goes to the hub only, never to the storage host it redirects to.
    assert [(m, a) for m, _, a, _ in hub.requests] == [("HEAD", "Bearer good"), ("HEAD", "Bearer good"),
                                                    ("GET", None)]


def test_a_gated_file_that_differs_from_the_hubs_digest_is_deleted(hub_at, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "hub_token", lambda: "good")
    with hub_at(HubServer({("org/repo", "sam3.pt"): SAM3_BYTES}, gated=("org/repo",), lfs_digest="1" * 64)):
        with pytest.raises(weights.ChecksumError, match="sha256 .*expected 1111.*it was deleted"):
            weights.fetch_entry("sam3.pt", tmp_path, gated_manifest(), **FAST)
    assert not (tmp_path / "sam3.pt").exists()


def test_a_present_gated_file_is_used_unverified_without_a_token(hub_at, tmp_path, caplog):
    (tmp_path / "sam3.pt").write_bytes(SAM3_BYTES)
    with hub_at(HubServer({("org/repo", "sam3.pt"): SAM3_BYTES}, gated=("org/repo",))) as hub:
        [path] = weights.fetch_entry("sam3.pt", tmp_path, gated_manifest(), **FAST)
    assert hub.requests == [] and path == tmp_path / "sam3.pt" and "NOT VERIFIED" in caplog.text


def test_a_public_hub_file_is_verified_by_the_hub_then_offline_from_its_stamp(hub_at, tmp_path, caplog):
    caplog.set_level("INFO", logger="weights")
    name = "sam2.1_hiera_tiny.pt"
    manifest = {name: {"files": [hub_spec(name, "facebook/sam2.1-hiera-tiny", "main", data=None)]}}
    with hub_at(HubServer({("facebook/sam2.1-hiera-tiny", name): SAM3_BYTES})) as hub:
        [path] = weights.fetch_entry(name, tmp_path, manifest, **FAST)
        assert [m for m, *_ in hub.requests] == ["HEAD", "HEAD", "GET"]
    assert path.read_bytes() == SAM3_BYTES and "downloaded from the hub" in caplog.text
    # The server is gone (offline): the file verified once is used as it is.
    assert weights.fetch_entry(name, tmp_path, manifest, **FAST) == [path]
    assert "verified against the hub's digest before" in caplog.text


def test_hf_endpoint_points_the_command_line_at_a_mirror(server, tmp_path):
    """HF_ENDPOINT, read by huggingface_hub itself: `weights.py --dir` fetches a hub file from the mirror."""
    manifest = _write(tmp_path / "m.json", {"sam3.pt": {"files": [hub_spec("sam3.pt", data=None)]}})
    with HubServer({("org/repo", "sam3.pt"): SAM3_BYTES}) as hub:
        done = subprocess.run([sys.executable, str(ROOT / "weights.py"), "--manifest", str(manifest), "--dir",
                               str(tmp_path / "models"), "--quiet", "sam3.pt"], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "HF_ENDPOINT": hub.url,
                                               "HF_HOME": str(tmp_path / "hf-home")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "sam3.pt").read_bytes() == SAM3_BYTES
    assert [m for m, *_ in hub.requests] == ["HEAD", "HEAD", "GET"]


def test_ensure_with_the_sam3_engine_fetches_its_checkpoint_and_checks_the_tokenizer(hub_at, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "hub_token", lambda: "good")
    manifest = weights.load_manifest()
    manifest["sam3.pt"] = gated_manifest()["sam3.pt"]
    with hub_at(HubServer({("org/repo", "sam3.pt"): SAM3_BYTES}, gated=("org/repo",))):
        done = weights.ensure(Settings.from_env({"ENGINE": "sam3", "MODEL_DIR": str(tmp_path),
                                                 "USE_MOBILE_SAM": "false"}), manifest, **FAST)
    assert done == [tmp_path / "sam3.pt", Path(Settings.from_env({}).sam3_tokenizer)]
