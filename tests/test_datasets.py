"""Named data sets: downloaded once, checked against sha256, cached; offline gives a clear error."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from rnngen.corpora import dataset_registry, fetch_dataset
from rnngen.errors import InputError


@pytest.fixture
def server(tmp_path: Path):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_checks_sha256_and_caches(tmp_path: Path, server: str) -> None:
    data = b"To be, or not to be\n" * 50
    (tmp_path / "plays.txt").write_bytes(data)
    entry = {"url": f"{server}/plays.txt", "sha256": hashlib.sha256(data).hexdigest(), "filename": "plays.txt"}
    path = fetch_dataset("plays", {"plays": entry})
    assert path.read_bytes() == data
    (tmp_path / "plays.txt").unlink()  # the second call is served from the cache
    assert fetch_dataset("plays", {"plays": entry}) == path


def test_fetch_rejects_a_wrong_checksum(tmp_path: Path, server: str) -> None:
    (tmp_path / "x.txt").write_bytes(b"tampered")
    entry = {"url": f"{server}/x.txt", "sha256": "0" * 64, "filename": "x.txt"}
    with pytest.raises(InputError, match="sha256"):
        fetch_dataset("x", {"x": entry})


def test_fetch_joins_zip_members(tmp_path: Path, server: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("data/names/B.txt", "Bee\n")
        archive.writestr("data/names/A.txt", "Ay\n")
        archive.writestr("data/other.txt", "skip me")
    (tmp_path / "d.zip").write_bytes(buf.getvalue())
    entry = {"url": f"{server}/d.zip", "zip_members": "data/names/*.txt",
             "sha256": hashlib.sha256(b"Ay\nBee\n").hexdigest(), "filename": "names.txt"}
    assert fetch_dataset("names", {"names": entry}).read_text() == "Ay\nBee\n"


def test_registry_names_the_public_data_sets() -> None:
    registry = dataset_registry()
    assert {"tinyshakespeare", "names"} <= set(registry)
    assert all(len(e["sha256"]) == 64 and e["url"].startswith("https://") for e in registry.values())


def test_shared_copies_match_the_recorded_checksums() -> None:
    """The sha256 values were taken from ../shared's copies of the same public files."""
    from conftest import SHARED

    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not present")
    registry = dataset_registry()
    shakespeare = (SHARED / "data" / "tinyshakespeare.txt").read_bytes()
    assert hashlib.sha256(shakespeare).hexdigest() == registry["tinyshakespeare"]["sha256"]
    names = b"".join(p.read_bytes() for p in sorted((SHARED / "data" / "names").glob("*.txt")))
    assert hashlib.sha256(names).hexdigest() == registry["names"]["sha256"]
