"""download_url (plain https mirrors) and download_hf (the Hub via huggingface_hub) against a loopback server.

Covers: first download, cache hit with the server gone, resume of a cut download (Range request), sha256 mismatch
(file deleted), gated access (401/403), offline mode without a cache, HTTP errors, concurrent downloads.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from _fake_hub import FakeHub, point_hf_at
from fd_eval.errors import ChecksumError, DownloadError, GatedRepoError
from fd_eval.util.download import HfLocation, download_hf, download_url

DATA = os.urandom(700_000)  # ~11 chunks of 64 KiB
SHA = hashlib.sha256(DATA).hexdigest()
REPO = "stanford-vision-lab/gpic"
FILE = "reference_stats/test_stats.npz"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub; network allowed; huggingface_hub pointed at it with a per-test cache."""
    with FakeHub() as h:
        point_hf_at(h, monkeypatch, tmp_path / "hf_cache")
        yield h


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- hf:// locations -------------------------------------------------------------------------------
def test_hf_location_parse_and_format():
    loc = HfLocation.parse(f"hf://datasets/{REPO}/{FILE}")
    assert (loc.repo_type, loc.repo_id, loc.filename, loc.revision) == ("dataset", REPO, FILE, None)
    assert str(loc) == f"hf://datasets/{REPO}/{FILE}"
    assert loc.page_url() == f"https://huggingface.co/datasets/{REPO}"
    loc = HfLocation.parse("hf://org/model@v1.0/weights/a.safetensors")
    assert (loc.repo_type, loc.repo_id, loc.filename, loc.revision) == ("model", "org/model", "weights/a.safetensors",
                                                                        "v1.0")
    assert str(loc) == "hf://org/model@v1.0/weights/a.safetensors"
    for bad in ("hf://datasets/org/repo", "hf://org//x", "https://huggingface.co/x"):
        with pytest.raises(DownloadError, match="hf://"):
            HfLocation.parse(bad)


# --- plain URLs ----------------------------------------------------------------------------------------
def test_url_download_then_cache_hit_without_server(hub, tmp_path):
    url = hub.add_mirror("stats.npz", DATA)
    dest = tmp_path / "c" / "stats.npz"
    assert download_url(url, dest, sha256=SHA, progress=False) == dest
    assert _sha(dest) == SHA and not dest.with_name("stats.npz.part").exists()
    hub.stop()
    assert download_url(url, dest, sha256=SHA, progress=False, offline=False) == dest  # no request needed
    assert len(hub.body_gets()) == 1


def test_url_resume_within_call_after_drop(hub, tmp_path):
    url = hub.add_mirror("stats.npz", DATA)
    hub.cuts = [250_000]  # the first response dies after 250 KB
    dest = download_url(url, tmp_path / "stats.npz", sha256=SHA, progress=False)
    assert _sha(dest) == SHA
    gets = hub.body_gets("/mirror/stats.npz")
    assert [g.range for g in gets] == [None, "bytes=250000-"]


def test_url_resume_in_next_call_after_failure(hub, tmp_path):
    url = hub.add_mirror("stats.npz", DATA)
    hub.cuts = [300_000, 0]  # the first response dies mid-body, the retry gets nothing: the call gives up
    dest = tmp_path / "stats.npz"
    with pytest.raises(DownloadError, match="300000 bytes kept in .* to resume from.*run again"):
        download_url(url, dest, sha256=SHA, progress=False)
    part = dest.with_name("stats.npz.part")
    assert not dest.exists() and part.stat().st_size == 300_000
    assert download_url(url, dest, sha256=SHA, progress=False) == dest
    assert _sha(dest) == SHA and not part.exists()
    assert [g.range for g in hub.body_gets()] == [None, "bytes=300000-", "bytes=300000-"]


def test_url_complete_or_overlong_partial_file(hub, tmp_path):
    url = hub.add_mirror("stats.npz", DATA)
    dest = tmp_path / "stats.npz"
    dest.with_name("stats.npz.part").write_bytes(DATA)  # complete: the server answers 416
    assert _sha(download_url(url, dest, sha256=SHA, progress=False)) == SHA
    dest.unlink()
    dest.with_name("stats.npz.part").write_bytes(DATA + b"junk")  # longer than the file: start over
    assert _sha(download_url(url, dest, sha256=SHA, progress=False)) == SHA
    assert [g.range for g in hub.body_gets()] == [f"bytes={len(DATA)}-", f"bytes={len(DATA) + 4}-", None]


def test_url_sha_mismatch_deletes(hub, tmp_path):
    url = hub.add_mirror("stats.npz", DATA)
    dest = tmp_path / "stats.npz"
    with pytest.raises(ChecksumError, match="the file was deleted") as e:
        download_url(url, dest, sha256="0" * 64, progress=False)
    assert url in str(e.value) and "\n" not in str(e.value)
    assert not dest.exists() and not dest.with_name("stats.npz.part").exists()


def test_url_offline_and_http_errors(hub, tmp_path):
    url = hub.add_mirror("stats.npz", DATA)
    with pytest.raises(DownloadError, match="offline mode is on"):
        download_url(url, tmp_path / "a.npz", offline=True, progress=False)
    assert hub.requests == []
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_url(f"{hub.url}/mirror/missing.npz", tmp_path / "b.npz", progress=False)
    assert len(hub.requests) == 1  # an HTTP error is an answer, not retried
    hub.stop()
    with pytest.raises(DownloadError, match="could not download"):
        download_url(url, tmp_path / "c.npz", progress=False)


def test_url_concurrent_downloads_share_one_transfer(hub, tmp_path):
    url = hub.add_mirror("stats.npz", DATA)
    hub.throttle = 0.03  # ~0.3 s per download, so the two overlap
    dest = tmp_path / "stats.npz"
    results, errors = [], []
    barrier = threading.Barrier(2)

    def worker():
        try:
            barrier.wait()
            results.append(download_url(url, dest, sha256=SHA, progress=False))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and results == [dest, dest]
    assert _sha(dest) == SHA and len(hub.body_gets()) == 1


# --- the Hub -------------------------------------------------------------------------------------------
def test_hf_download_then_cache_hit_without_server(hub):
    loc = hub.add_file(REPO, FILE, DATA)
    path = download_hf(loc, progress=False)
    assert path.name == "test_stats.npz" and _sha(path) == SHA
    assert path.resolve().name == SHA  # the HF cache names LFS blobs by their sha256
    hub.stop()
    assert download_hf(loc, offline=True, progress=False) == path
    assert download_hf(loc, offline=False, progress=False) == path  # Hub unreachable: falls back to the cache


def test_hf_resume_after_drop_uses_range(hub):
    loc = hub.add_file(REPO, FILE, DATA)
    hub.cuts = [300_000]
    path = download_hf(loc, progress=False)
    assert _sha(path) == SHA
    gets = hub.body_gets(FILE)
    assert len(gets) == 2 and gets[0].range is None
    start = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 300_000  # resumed from what had been written, not from zero


def test_hf_lfs_redirect_token_not_sent_to_cdn(hub, monkeypatch):
    loc = hub.add_file(REPO, FILE, DATA)
    hub.gated[f"datasets/{REPO}"], hub.token, hub.lfs_redirect = 401, "hf_secret", True
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = download_hf(loc, progress=False)
    assert _sha(path) == SHA
    head = [r for r in hub.requests if r.method == "HEAD"]
    assert head and head[0].headers["authorization"] == "Bearer hf_secret"
    (cdn,) = hub.body_gets()
    assert cdn.path == f"/cdn/{SHA}" and "authorization" not in cdn.headers


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("error_code", [True, False])
def test_hf_gated_refused(hub, monkeypatch, status, error_code):
    loc = hub.add_file(REPO, FILE, DATA)
    hub.gated[f"datasets/{REPO}"], hub.token, hub.gated_error_code = status, "hf_good", error_code
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(GatedRepoError) as e:
        download_hf(loc, progress=False, access_url=f"https://huggingface.co/datasets/{REPO}")
    msg = str(e.value)
    assert "\n" not in msg and f"HTTP {status}" in msg
    assert f"https://huggingface.co/datasets/{REPO}" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert "a token was sent" in msg and "hf_wrong" not in msg
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert _sha(download_hf(loc, progress=False)) == SHA


def test_hf_sha_mismatch_deletes_blob_and_link(hub):
    loc = hub.add_file(REPO, FILE, DATA)
    with pytest.raises(ChecksumError, match="expected 0000000000000000.*was deleted"):
        download_hf(loc, sha256="0" * 64, progress=False)
    from huggingface_hub import constants as hfc

    left = [p.name for p in Path(hfc.HF_HUB_CACHE).rglob("*") if p.is_file() or p.is_symlink()]
    assert "test_stats.npz" not in left and SHA not in left and not any("incomplete" in n for n in left), left
    assert _sha(download_hf(loc, sha256=SHA, progress=False)) == SHA  # a clean second try works


def test_hf_transfer_corruption_caught_by_hub_sha(hub):
    loc = hub.add_file(REPO, FILE, DATA)
    hub.tamper = True  # right length, wrong bytes: huggingface_hub's size check passes
    with pytest.raises(ChecksumError, match="Hub's"):
        download_hf(loc, progress=False)
    hub.tamper = False
    assert _sha(download_hf(loc, progress=False)) == SHA


def test_hf_offline_without_cache_and_not_found(hub):
    loc = hub.add_file(REPO, FILE, DATA)
    with pytest.raises(DownloadError, match="not in the cache and offline mode is on"):
        download_hf(loc, offline=True, progress=False)
    assert hub.requests == []
    with pytest.raises(DownloadError, match="not found .*404"):
        download_hf(f"hf://datasets/{REPO}/reference_stats/nope.npz", progress=False)
    with pytest.raises(DownloadError, match="not found .*404"):
        download_hf("hf://datasets/other/repo/x.npz", progress=False)
    with pytest.raises(DownloadError, match="offline"):
        download_hf(loc, offline=True, force=True, progress=False)
