"""The prepare stage: good archives load, every bad input fails with one line and leaves nothing behind."""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from archive_factory import batch_bytes, make_files, write_archive
from paper_repro import archives, data, fetch
from paper_repro.data import DataError, load_prepared, prepare, validation_split

ROOT = Path(__file__).resolve().parents[1]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".part-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- good input
def test_prepare_writes_arrays_and_provenance(tmp_path, tiny_archive):
    meta = prepare(str(tiny_archive), tmp_path / "out", md5=md5(tiny_archive))
    got = load_prepared(tmp_path / "out")
    assert got.x_train.shape == (150, 3, 32, 32) and got.x_train.dtype == np.uint8
    assert got.x_test.shape == (20, 3, 32, 32) and got.y_test.dtype == np.int64
    assert sorted(np.unique(got.y_train)) == list(range(10))
    assert meta["official"] is False and got.meta == json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["archive_md5"] == md5(tiny_archive)
    assert set(meta["files_md5"]) == {"data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                      "data_batch_5", "test_batch", "batches.meta"}
    assert meta["counts"] == {"train": 150, "test": 20}
    assert leftovers(tmp_path) == []


def test_images_keep_their_pixels(tmp_path):
    files = make_files()
    pixels = np.arange(30 * 3072, dtype=np.int64).reshape(30, 3072) % 251
    files["data_batch_1"] = batch_bytes(pixels.astype(np.uint8), [i % 10 for i in range(30)])
    prepare(str(write_archive(tmp_path / "a.tar.gz", files)), tmp_path / "out")
    got = load_prepared(tmp_path / "out")
    # planar RGB rows -> (3, 32, 32): pixel (c, r, col) is element c*1024 + r*32 + col of the row
    assert np.array_equal(got.x_train[0].reshape(-1), pixels[0].astype(np.uint8))
    assert got.x_train[0, 1, 2, 3] == pixels[0, 1024 + 2 * 32 + 3]


def test_official_flag_true_only_when_every_file_md5_matches(tmp_path, tiny_archive, monkeypatch):
    files = make_files()
    monkeypatch.setattr(archives, "OFFICIAL_FILE_MD5", {n: hashlib.md5(b).hexdigest() for n, b in files.items()})
    assert prepare(str(tiny_archive), tmp_path / "a")["official"] is True
    other = dict(files, test_batch=batch_bytes(np.zeros((20, 3072), np.uint8), [i % 10 for i in range(20)]))
    assert prepare(str(write_archive(tmp_path / "b.tar.gz", other)), tmp_path / "b")["official"] is False


def test_limits_cut_the_arrays(tmp_path, tiny_archive):
    meta = prepare(str(tiny_archive), tmp_path / "out", train_limit=40, test_limit=7)
    got = load_prepared(tmp_path / "out")
    assert (len(got.y_train), len(got.y_test)) == (40, 7)
    assert meta["counts_in_archive"] == {"train": 150, "test": 20} and meta["limits"] == {"train": 40, "test": 7}


def test_expected_counts_are_enforced(tmp_path, tiny_archive):
    with pytest.raises(DataError, match="150 train / 20 test images, expected 50000 / 10000"):
        prepare(str(tiny_archive), tmp_path / "out", expect_counts=[50000, 10000])
    assert not (tmp_path / "out").exists()


def test_validation_split_is_seeded_disjoint_and_complete():
    train, val = validation_split(100, 10, seed=3)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert np.array_equal(val, validation_split(100, 10, seed=3)[1])
    assert not np.array_equal(val, validation_split(100, 10, seed=4)[1])


# --------------------------------------------------------------------------- bad input
def corrupt_archives(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = write_archive(tmp_path / "good.tar.gz", make_files())
    blob = good.read_bytes()
    cases = {}
    (tmp_path / "truncated.tar.gz").write_bytes(blob[: len(blob) // 2])
    cases["truncated"] = (tmp_path / "truncated.tar.gz", "unreadable archive")
    (tmp_path / "garbage.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 40)
    cases["garbage"] = (tmp_path / "garbage.tar.gz", "unreadable archive")
    files = make_files()
    del files["test_batch"]
    cases["missing member"] = (write_archive(tmp_path / "layout.tar.gz", files), "missing cifar-10-batches-py/test_batch")
    cases["wrong folder"] = (write_archive(tmp_path / "folder.tar.gz", make_files(), prefix="cifar/"), "not a CIFAR-10")
    files = make_files()
    files["data_batch_2"] = batch_bytes(np.zeros((30, 1024), np.uint8), [0] * 30)
    cases["wrong shape"] = (write_archive(tmp_path / "shape.tar.gz", files), "3x32x32=3072")
    files = make_files()
    files["data_batch_3"] = batch_bytes(np.zeros((30, 3072), np.uint8), [12] * 30)
    cases["bad labels"] = (write_archive(tmp_path / "labels.tar.gz", files), "labels must lie in 0..9")
    files = make_files()
    files["data_batch_4"] = b"not a pickle"
    cases["not a pickle"] = (write_archive(tmp_path / "pickle.tar.gz", files), "not a CIFAR-10 python batch")
    files = make_files()
    files["data_batch_5"] = b"cos\nsystem\n(S'echo pwned'\ntR."
    cases["malicious pickle"] = (write_archive(tmp_path / "evil.tar.gz", files), "forbidden global os.system")
    for kind, name in [("abs", "/etc/evil"), ("dotdot", "cifar-10-batches-py/../../evil")]:
        info = tarfile.TarInfo(name)
        info.size = 1
        cases[kind] = (write_archive(tmp_path / f"{kind}.tar.gz", make_files(), extra=[info]),
                       "absolute member path" if kind == "abs" else "escaping the target folder")
    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases["symlink"] = (write_archive(tmp_path / "link.tar.gz", make_files(), extra=[link]), "link member")
    return cases


@pytest.fixture
def good_output(tmp_path, tiny_archive) -> tuple[Path, bytes]:
    out = tmp_path / "prepared"
    prepare(str(tiny_archive), out)
    return out, (out / data.ARRAYS_FILE).read_bytes()


@pytest.mark.parametrize("case", ["truncated", "garbage", "missing member", "wrong folder", "wrong shape",
                                  "bad labels", "not a pickle", "malicious pickle", "abs", "dotdot", "symlink"])
def test_bad_archives_fail_cleanly_and_keep_earlier_output(tmp_path, good_output, case):
    out, before = good_output
    archive, message = corrupt_archives(tmp_path / "bad" if (tmp_path / "bad").mkdir() is None else tmp_path)[case]
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        prepare(str(archive), out)
    assert "\n" not in str(err.value)
    assert (out / data.ARRAYS_FILE).read_bytes() == before
    assert leftovers(tmp_path) == [] and not (tmp_path / "etc").exists()


def test_missing_file_and_wrong_md5(tmp_path, tiny_archive):
    with pytest.raises(DataError, match="archive not found"):
        prepare(str(tmp_path / "nope.tar.gz"), tmp_path / "out")
    with pytest.raises(DataError, match="md5 mismatch"):
        prepare(str(tiny_archive), tmp_path / "out", md5="0" * 32)
    assert not (tmp_path / "out").exists()


def test_cli_reports_one_line_error_and_nonzero_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "prepare", "--params", str(tmp_path / "none.yaml"),
                           "--source", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: archive not found")
    assert not (tmp_path / "out").exists()


def test_cli_honours_environment_archive(tmp_path, tiny_archive):
    env = {**__import__("os").environ, "CIFAR10_ARCHIVE": str(tiny_archive)}
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "prepare", "--params", str(tmp_path / "none.yaml"),
                           "--any-size", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["source"] == tiny_archive.name  # a name, not a path


# --------------------------------------------------------------------------- download
class _Server:
    """A loopback HTTP server (random port) whose behaviour the test chooses."""

    def __init__(self, payload: bytes, mode: str = "ok"):
        outer = self
        self.payload, self.mode, self.requests = payload, mode, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()

            def do_GET(self):
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                body = outer.payload
                if outer.mode == "drop":
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if outer.mode == "wrong":
                    body = body[::-1]
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/cifar-10-python.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(fetch, "DOWNLOAD_BACKOFF_S", 0.0)


def test_download_verifies_and_prepares(tmp_path, tiny_archive):
    with _Server(tiny_archive.read_bytes()) as server:
        meta = prepare(server.url, tmp_path / "out", md5=md5(tiny_archive),
                       download_to=tmp_path / "dl" / "cifar-10-python.tar.gz")
    assert meta["archive_md5"] == md5(tiny_archive) and meta["source"] == server.url
    assert md5(tmp_path / "dl" / "cifar-10-python.tar.gz") == md5(tiny_archive)
    assert leftovers(tmp_path / "dl") == []


@pytest.mark.parametrize("mode, message", [("wrong", "md5 mismatch"), ("drop", "md5 mismatch|IncompleteRead")])
def test_bad_downloads_retry_then_fail_without_leftovers(tmp_path, tiny_archive, mode, message):
    dest = tmp_path / "dl" / "cifar-10-python.tar.gz"
    with _Server(tiny_archive.read_bytes(), mode) as server:
        with pytest.raises(DataError, match=f"could not download .* after 3 attempts .*({message})"):
            prepare(server.url, tmp_path / "out", md5=md5(tiny_archive), download_to=dest)
        assert server.requests >= 3  # every attempt reached the server
    assert not dest.exists() and leftovers(tmp_path / "dl") == [] and not (tmp_path / "out").exists()


def test_unreachable_url_fails_with_advice(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="--source PATH or CIFAR10_ARCHIVE=PATH"):
        prepare(f"http://127.0.0.1:{port}/x.tar.gz", tmp_path / "out", md5="0" * 32,
                download_to=tmp_path / "dl" / "x.tar.gz")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the shared stand-in
@pytest.mark.slow
def test_shared_standin_prepares_as_not_official(tmp_path, shared_dir):
    script = shared_dir / "data" / "make_cifar10_standin.py"
    if not (shared_dir / "data" / "cifar10-jpeg-standin.tar.gz").exists():
        pytest.skip("../shared/data/cifar10-jpeg-standin.tar.gz not present")
    archive = tmp_path / "standin.tar.gz"
    subprocess.run([sys.executable, str(script), str(archive), "--train", "5000", "--test", "1000"],
                   check=True, capture_output=True)
    meta = prepare(str(archive), tmp_path / "out")
    assert meta["official"] is False and meta["counts"] == {"train": 5000, "test": 1000}
    got = load_prepared(tmp_path / "out")
    assert got.x_train.shape == (5000, 3, 32, 32) and np.bincount(got.y_test, minlength=10).min() > 0


# --------------------------------------------------------------------------- issue 17, item 12
def test_a_flipped_byte_is_a_corrupt_archive(tmp_path, tiny_archive):
    blob = bytearray(tiny_archive.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    flipped = tmp_path / "flipped.tar.gz"
    flipped.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="unreadable archive .*truncated or corrupt"):
        prepare(str(flipped), tmp_path / "out")


def test_a_test_split_without_every_class_is_refused(tmp_path):
    files = make_files()
    files["test_batch"] = batch_bytes(np.zeros((20, 3072), np.uint8), [3] * 20)
    with pytest.raises(DataError, match="test batches hold 1 classes, expected 10"):
        prepare(str(write_archive(tmp_path / "t.tar.gz", files)), tmp_path / "out")


def test_an_oversized_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(DataError, match=r"claims [\d,]+ bytes, more than any CIFAR-10 batch \(1,000\)"):
        prepare(str(write_archive(tmp_path / "big.tar.gz", make_files())), tmp_path / "out")


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, tiny_archive):
    out = tmp_path / "prepared"
    prepare(str(tiny_archive), out)
    before = (out / data.ARRAYS_FILE).read_bytes()
    aside = tmp_path / ".prepared.old-12345"
    out.rename(aside)  # what a kill after `os.replace(out, old)` leaves
    assert load_prepared(out).x_train.shape[0] > 0 and (out / data.ARRAYS_FILE).read_bytes() == before
    assert not aside.exists()
    out.rename(aside)
    prepare(str(tiny_archive), out)  # a new prepare also restores first, then swaps as usual
    assert (out / data.ARRAYS_FILE).read_bytes() == before and not list(tmp_path.glob(".prepared.*"))
