"""Asset fetching against a real HTTP server on 127.0.0.1: resume, hash checks, offline failure, unpacking.

Nothing here leaves the loopback interface; the official URLs are only checked for their shape.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.config import Config
from picosam_pipeline.data import fetch as F
from picosam_pipeline.datasets import layout
from picosam_pipeline.errors import PipelineError

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB: several CHUNK-free reads, big enough to cut in half
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer:
    """Serves ``files`` ({path: bytes}) with optional Range support and a one-off mid-transfer hang-up.

    ``requests`` records (path, Range header or None, status sent) for every GET.
    """

    def __init__(self, files: dict[str, bytes], *, honour_range: bool = True, break_first: bool = False):
        self.files, self.honour_range, self.break_first = files, honour_range, break_first
        self.requests: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                data = server.files.get(self.path)
                rng = self.headers.get("Range")
                if data is None:
                    server.requests.append((self.path, rng, 404))
                    self.send_error(404)
                    return
                start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng and server.honour_range else 0
                if start >= len(data) and rng and server.honour_range:
                    server.requests.append((self.path, rng, 416))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206 if start else 200
                server.requests.append((self.path, rng, status))
                body = data[start:]
                self.send_response(status)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.break_first:  # promise the whole body, send half, hang up
                    server.break_first = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment would intercept 127.0.0.1 requests.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def checkpoint(sha256: str | None = PAYLOAD_SHA) -> F.Asset:
    return F.Asset("test_ckpt", "http://unused.invalid/x.pt", "checkpoints/test.pt", sha256, "test", "300 KB")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: connecting is refused at once


# --------------------------------------------------------------------------------------------------
# downloads


def test_full_download_verifies_and_renames_then_skips(tmp_path):
    with FileServer({"/x.pt": PAYLOAD}) as srv:
        msg = F.fetch(checkpoint(), tmp_path, url=srv.base + "/x.pt")
        out = tmp_path / "checkpoints/test.pt"
        assert out.read_bytes() == PAYLOAD and "downloaded" in msg and PAYLOAD_SHA in msg
        assert not (tmp_path / "checkpoints/test.pt.part").exists()
        again = F.fetch(checkpoint(), tmp_path, url=srv.base + "/x.pt")
    assert "verified" in again and len(srv.requests) == 1  # the existing file was hashed, not refetched


def test_interrupted_transfer_resumes_with_range_to_the_right_bytes(tmp_path):
    with FileServer({"/x.pt": PAYLOAD}, break_first=True) as srv:
        F.fetch(checkpoint(), tmp_path, url=srv.base + "/x.pt")
    half = len(PAYLOAD) // 2
    assert srv.requests == [("/x.pt", None, 200), ("/x.pt", f"bytes={half}-", 206)]
    assert (tmp_path / "checkpoints/test.pt").read_bytes() == PAYLOAD


def test_interruption_without_resumes_keeps_part_and_a_rerun_finishes(tmp_path):
    with FileServer({"/x.pt": PAYLOAD}, break_first=True) as srv:
        with pytest.raises(PipelineError, match="broke off.*rerunning the same command resumes"):
            F.fetch(checkpoint(), tmp_path, url=srv.base + "/x.pt", resumes=0)
        part = tmp_path / "checkpoints/test.pt.part"
        assert part.read_bytes() == PAYLOAD[: len(PAYLOAD) // 2]
        assert not (tmp_path / "checkpoints/test.pt").exists()
        F.fetch(checkpoint(), tmp_path, url=srv.base + "/x.pt", resumes=0)
    assert srv.requests[-1][1:] == (f"bytes={len(PAYLOAD) // 2}-", 206)
    assert (tmp_path / "checkpoints/test.pt").read_bytes() == PAYLOAD and not part.exists()


def test_server_that_ignores_range_restarts_from_zero(tmp_path):
    part = tmp_path / "checkpoints/test.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes that a resume must not keep")
    with FileServer({"/x.pt": PAYLOAD}, honour_range=False) as srv:
        F.fetch(checkpoint(), tmp_path, url=srv.base + "/x.pt")
    assert srv.requests == [("/x.pt", f"bytes={len(b'stale bytes that a resume must not keep')}-", 200)]
    assert (tmp_path / "checkpoints/test.pt").read_bytes() == PAYLOAD


def test_complete_part_gets_416_and_is_accepted(tmp_path):
    part = tmp_path / "checkpoints/test.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)  # e.g. interrupted between the last byte and the rename
    with FileServer({"/x.pt": PAYLOAD}) as srv:
        F.fetch(checkpoint(), tmp_path, url=srv.base + "/x.pt")
    assert [r[2] for r in srv.requests] == [416]
    assert (tmp_path / "checkpoints/test.pt").read_bytes() == PAYLOAD


def test_bad_hash_removes_part_and_writes_no_final_file(tmp_path):
    wrong = "0" * 64
    with FileServer({"/x.pt": PAYLOAD}) as srv:
        with pytest.raises(PipelineError) as err:
            F.fetch(checkpoint(wrong), tmp_path, url=srv.base + "/x.pt")
    msg = str(err.value)
    assert f"expected {wrong}" in msg and f"got {PAYLOAD_SHA}" in msg and "was removed" in msg
    assert not (tmp_path / "checkpoints/test.pt").exists()
    assert not (tmp_path / "checkpoints/test.pt.part").exists()


def test_unreachable_url_fails_fast_with_manual_instructions(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/x.pt"
    start = time.perf_counter()
    with pytest.raises(PipelineError) as err:
        F.fetch(checkpoint(), tmp_path, url=url, timeout=3)
    assert time.perf_counter() - start < 3
    msg = str(err.value)
    assert f"cannot reach {url}" in msg and "by hand" in msg
    assert str(tmp_path / "checkpoints/test.pt") in msg and PAYLOAD_SHA in msg
    assert not any(tmp_path.iterdir())  # no empty folders, no .part


def test_http_error_names_the_status(tmp_path):
    with FileServer({}) as srv, pytest.raises(PipelineError, match="HTTP 404"):
        F.fetch(checkpoint(), tmp_path, url=srv.base + "/missing.pt")


def test_file_placed_by_hand_is_verified(tmp_path):
    out = tmp_path / "checkpoints/test.pt"
    out.parent.mkdir(parents=True)
    out.write_bytes(PAYLOAD)
    assert "verified" in F.fetch(checkpoint(), tmp_path, url=f"http://127.0.0.1:{closed_port()}/x.pt")
    out.write_bytes(PAYLOAD[:-1])
    with pytest.raises(PipelineError, match="exists but its sha256"):
        F.fetch(checkpoint(), tmp_path)


# --------------------------------------------------------------------------------------------------
# trust on first use, archives


def test_trust_on_first_use_records_then_enforces_the_lock(tmp_path):
    asset = checkpoint(sha256=None)
    with FileServer({"/x.pt": PAYLOAD, "/y.pt": PAYLOAD + b"tampered"}) as srv:
        msg = F.fetch(asset, tmp_path, url=srv.base + "/x.pt")
        lock = json.loads((tmp_path / F.LOCK_NAME).read_text())
        assert lock["test_ckpt"]["sha256"] == PAYLOAD_SHA and lock["test_ckpt"]["bytes"] == len(PAYLOAD)
        assert "trusted on first use" in msg
        (tmp_path / "checkpoints/test.pt").unlink()
        with pytest.raises(PipelineError, match=f"expected {PAYLOAD_SHA} \\(recorded in .*{F.LOCK_NAME}"):
            F.fetch(asset, tmp_path, url=srv.base + "/y.pt")
    assert not (tmp_path / "checkpoints/test.pt").exists()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_asset_is_unpacked_merged_and_the_archive_removed(tmp_path):
    archive = zip_bytes(
        {"annotations/instances_val2017.json": b'{"images": []}', "annotations/captions_val2017.json": b"{}"}
    )
    asset = F.Asset(
        "test_ann",
        "http://unused.invalid/a.zip",
        "downloads/a.zip",
        hashlib.sha256(archive).hexdigest(),
        "test",
        "1 KB",
        unpack_to="coco",
        provides=("coco/annotations/instances_val2017.json",),
    )
    lvis = tmp_path / "coco/annotations/lvis_v1_val.json"  # fetched earlier into the same folder
    lvis.parent.mkdir(parents=True)
    lvis.write_text("{}")
    with FileServer({"/a.zip": archive}) as srv:
        F.fetch(asset, tmp_path, url=srv.base + "/a.zip")
        assert (tmp_path / "coco/annotations/instances_val2017.json").read_bytes() == b'{"images": []}'
        assert lvis.exists()  # merged into, not replaced
        assert not (tmp_path / "downloads/a.zip").exists()
        assert [p.name for p in (tmp_path / "coco").iterdir()] == ["annotations"]  # no staging left
        assert "already in place" in F.fetch(asset, tmp_path, url=srv.base + "/a.zip")
    assert len(srv.requests) == 1


def test_zip_without_the_expected_content_is_an_error(tmp_path):
    archive = zip_bytes({"something_else.json": b"{}"})
    asset = F.Asset(
        "test_ann",
        "http://unused.invalid/a.zip",
        "downloads/a.zip",
        hashlib.sha256(archive).hexdigest(),
        "test",
        "1 KB",
        unpack_to="coco",
        provides=("coco/annotations/instances_val2017.json",),
    )
    with FileServer({"/a.zip": archive}) as srv, pytest.raises(PipelineError, match="did not appear"):
        F.fetch(asset, tmp_path, url=srv.base + "/a.zip")


# --------------------------------------------------------------------------------------------------
# table and CLI


def test_table_matches_the_default_params_and_holds_only_wellformed_hashes():
    assert Config().teacher.checkpoint == "data/" + F.ASSETS["sam2.1_hiera_tiny"].path
    for a in F.ASSETS.values():
        assert a.url.startswith(("http://images.cocodataset.org/", "https://dl.fbaipublicfiles.com/"))
        assert a.sha256 is None or (re.fullmatch(r"[0-9a-f]{64}", a.sha256) and a.hash_source)
    outputs = {p for a in F.ASSETS.values() for p in a.outputs}
    assert "checkpoints/sam2.1_hiera_large.pt" in outputs
    # Every annotations file and image folder of a fetchable dataset's layout (picosam_pipeline/datasets.py) is what
    # fetch puts there: an asset's output, or (LVIS) a folder linked from COCO's.
    for name in F.DATASETS:
        linked = {dst for _, dst in F.SHARED_IMAGES.get(name, ())}
        for annotations_file, images in layout(name).splits.values():
            assert f"datasets/{name}/{annotations_file}" in outputs
            assert f"datasets/{name}/{images}" in outputs | linked
        assert {a.name for a in F.expand([name])} == set(F.DATASETS[name])


def test_lvis_shares_the_coco_images_as_hard_links(tmp_path):
    for split in ("train2017", "val2017"):
        (tmp_path / "datasets/coco2017" / split).mkdir(parents=True)
        (tmp_path / "datasets/coco2017" / split / f"{split}_1.jpg").write_bytes(b"jpeg " + split.encode())
    assert F.link_images(tmp_path, "lvis_v1").startswith("lvis_v1: 2 COCO images linked")
    linked = tmp_path / "datasets/lvis_v1/val2017/val2017_1.jpg"
    assert (
        linked.read_bytes() == b"jpeg val2017"
        and linked.stat().st_ino == (tmp_path / "datasets/coco2017/val2017/val2017_1.jpg").stat().st_ino
    )  # the same file, no copy
    assert F.link_images(tmp_path, "lvis_v1") == "lvis_v1: images in place"  # a rerun has nothing to do
    with pytest.raises(PipelineError, match="coco2017/val2017 is missing: fetch the COCO images first"):
        F.link_images(tmp_path / "elsewhere", "lvis_v1")


def test_cli_fetch_list_download_and_errors(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(cli, ["fetch", "--list"])
    assert listed.exit_code == 0 and all(name in listed.output for name in F.ASSETS)

    with FileServer({"/x.pt": PAYLOAD}) as srv:
        args = ["fetch", "sam2.1_hiera_tiny", "--url", srv.base + "/x.pt", "--dest-root", str(tmp_path)]
        ok = runner.invoke(cli, args + ["--sha256", PAYLOAD_SHA.upper()])
        assert ok.exit_code == 0, ok.output
        assert (tmp_path / "checkpoints/sam2.1_hiera_tiny.pt").read_bytes() == PAYLOAD
        (tmp_path / "checkpoints/sam2.1_hiera_tiny.pt").unlink()
        bad = runner.invoke(cli, args)  # the published digest of the real checkpoint cannot match PAYLOAD
        assert bad.exit_code == 1 and "sha256 mismatch" in bad.output and "Traceback" not in bad.output

    offline = runner.invoke(
        cli,
        [
            "fetch",
            "sam2.1_hiera_small",
            "--dest-root",
            str(tmp_path),
            "--url",
            f"http://127.0.0.1:{closed_port()}/x.pt",
        ],
    )
    assert offline.exit_code == 1 and "by hand" in offline.output
    assert runner.invoke(cli, ["fetch", "nope"]).exit_code == 1
    assert runner.invoke(cli, ["fetch"]).exit_code == 2
    assert (
        runner.invoke(cli, ["fetch", "sam2.1_hiera_tiny", "--sha256", "xyz", "--dest-root", str(tmp_path)]).exit_code
        == 1
    )
    assert runner.invoke(cli, ["fetch", "coco_val2017", "lvis_v1_val", "--url", "http://x"]).exit_code == 2


def test_fetch_track_makes_the_checkpoint_a_dvc_tracked_input(tmp_path, monkeypatch):
    """`fetch --track` puts the file where params.yaml expects it and `dvc add`s it, ready for `dvc push`."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], check=True)
    with FileServer({"/x.pt": PAYLOAD}) as srv:
        result = CliRunner().invoke(
            cli, ["fetch", "sam2.1_hiera_small", "--url", srv.base + "/x.pt", "--sha256", PAYLOAD_SHA, "--track"]
        )
    assert result.exit_code == 0, result.output
    pointer = tmp_path / "data/checkpoints/sam2.1_hiera_small.pt.dvc"
    assert PAYLOAD_SHA not in pointer.read_text() and "md5:" in pointer.read_text()  # DVC's own pointer file
    assert "git add data/checkpoints/sam2.1_hiera_small.pt.dvc data/checkpoints/.gitignore" in result.output
    assert F.tracked_paths(["lvis_v1", "sam2.1_hiera_small"]) == [
        Path("data/datasets/lvis_v1"),
        Path("data/checkpoints/sam2.1_hiera_small.pt"),
    ]
    outside = CliRunner().invoke(
        cli,
        [
            "fetch",
            "sam2.1_hiera_small",
            "--dest-root",
            str(tmp_path.parent / "other"),
            "--url",
            "file:///nonexistent",
            "--track",
        ],
    )
    assert outside.exit_code == 1 and "Traceback" not in outside.output
