"""DANDI references, asset listing, verified downloads and streaming, against a DANDI test instance on 127.0.0.1."""

import hashlib
import json
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO

from neurpir_nwb.dandi import (
    LOCK_NAME,
    MANIFEST_NAME,
    STAGING_DIR_NAME,
    DandiRef,
    RetryPolicy,
    _glob_regex,
    _server_glob,
    fetch,
    list_assets,
    open_stream,
    parse_dandi_ref,
    resolve_api_url,
    stream_url,
)
from neurpir_nwb.errors import SourceError
from neurpir_nwb.progress import Progress
from tests.dandi_server import (  # noqa: F401 (dandi_server is a fixture)
    ALM_A,
    DRAFT_ASSETS,
    DRAFT_ONLY_ASSETS,
    DRAFT_ONLY_ID,
    LATEST_ASSETS,
    LATEST_VERSION,
    OLD_ASSETS,
    OLD_VERSION,
    PUBLISHED_ID,
    THALAMUS,
    closed_port,
    dandi_server,
    glob_regex,
    standard_files,
)

#: Retries with delays of 10 to 50 ms, so fault tests stay fast.
FAST = RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05)

ALM_A_PATH = next(path for path, name in DRAFT_ASSETS.items() if name == ALM_A)
PROBE_PATH = "sub-A8604/probe-1/sub-A8604_ses-211122_ecephys.nwb"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_of(shared_data: Path, asset_path: str) -> Path:
    """Return the real file served at ``asset_path`` by the standard Dandisets."""
    name = {**DRAFT_ASSETS, **DRAFT_ONLY_ASSETS}[asset_path]
    return standard_files(shared_data)[name]


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


class RecordingProgress(Progress):
    """Keeps every stage's description, total and reported progress."""

    def __init__(self):
        self.stages: list[dict] = []

    @contextmanager
    def stage(self, description, total):
        record = {"description": description, "total": total, "completed": []}
        self.stages.append(record)
        yield record["completed"].append


# References


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DANDI:000021", DandiRef("000021", None)),
        ("DANDI:000021/draft", DandiRef("000021", "draft")),
        ("DANDI:000021/0.210913.1639", DandiRef("000021", "0.210913.1639")),
        ("dandi:000021/DRAFT", DandiRef("000021", "draft")),
        ("  DANDI:000021  ", DandiRef("000021", None)),
    ],
)
def test_parse_ref_accepts(text, expected):
    assert parse_dandi_ref(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "000021",
        "DANDI:21",
        "DANDI:0000210",
        "DANDI:000021/",
        "DANDI:000021/latest",
        "DANDI:000021/0.2109.1639",
        "DANDI-SANDBOX:000021",
        "https://dandiarchive.org/dandiset/000021",
        "",
    ],
)
def test_parse_ref_rejects(text):
    with pytest.raises(SourceError) as info:
        parse_dandi_ref(text)

    message = str(info.value)
    assert repr(text) in message
    assert "DANDI:<6-digit id>" in message
    assert "DANDI:<id>/draft" in message


def test_ref_text_round_trip():
    for text in ("DANDI:000021", "DANDI:000021/draft", "DANDI:000021/0.210913.1639"):
        assert str(parse_dandi_ref(text)) == text


def test_api_url_from_environment(monkeypatch):
    monkeypatch.setenv("NEURPIR_DANDI_API_URL", "http://127.0.0.1:8000/api/")

    assert resolve_api_url() == "http://127.0.0.1:8000/api"
    assert resolve_api_url("http://127.0.0.1:9000/api") == "http://127.0.0.1:9000/api"


def test_api_url_default_and_invalid(monkeypatch):
    monkeypatch.delenv("NEURPIR_DANDI_API_URL", raising=False)

    assert resolve_api_url() == "https://api.dandiarchive.org/api"
    with pytest.raises(SourceError, match="ftp://example"):
        resolve_api_url("ftp://example")


# Globs


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("sub-*/*.nwb", "sub-1/sub-1_ses-1.nwb", True),
        ("sub-*/*.nwb", "sub-1/probe/sub-1.nwb", False),
        ("sub-*/**.nwb", "sub-1/probe/sub-1.nwb", True),
        ("**/*.nwb", "sub-1.nwb", True),
        ("**/*.nwb", "a/b/c/sub-1.nwb", True),
        ("sub-?/*.nwb", "sub-1/x.nwb", True),
        ("sub-?/*.nwb", "sub-12/x.nwb", False),
        ("sub-[12]/*.nwb", "sub-2/x.nwb", True),
        ("sub-[!12]/*.nwb", "sub-2/x.nwb", False),
        ("sub-[!12]/*.nwb", "sub-3/x.nwb", True),
        ("sub-1/x.nwb", "SUB-1/x.nwb", False),
        ("sub-1/x+y.nwb", "sub-1/x+y.nwb", True),
        ("*", "a/b", False),
    ],
)
def test_glob_matches(pattern, path, expected):
    assert bool(_glob_regex(pattern).fullmatch(path)) is expected
    if expected:
        # The archive receives a looser glob, so it never drops a path the client would keep.
        assert glob_regex(_server_glob(pattern)).match(path)


# Listing


@pytest.mark.network
def test_list_latest_published(dandi_server, shared_data):
    version, assets = list_assets("DANDI:000021", api_url=dandi_server.api_url)

    assert version == LATEST_VERSION
    assert [asset.path for asset in assets] == sorted(LATEST_ASSETS)
    for asset in assets:
        source = source_of(shared_data, asset.path)
        assert asset.size == source.stat().st_size
        assert asset.sha256 == sha256(source)
        assert asset.etag == dandi_server.asset(asset.path).blob.etag


@pytest.mark.network
def test_list_without_metadata(dandi_server):
    _, assets = list_assets("DANDI:000021/draft", api_url=dandi_server.api_url, metadata=False)

    assert [asset.path for asset in assets] == sorted(DRAFT_ASSETS)
    assert {asset.etag for asset in assets} == {None}
    assert {asset.sha256 for asset in assets} == {None}
    assert not [record for record in dandi_server.records if "/assets/" in record.path and record.path.endswith("/info/")]
    assert stream_url(assets[0]) == f"{dandi_server.base_url}/blobs/{dandi_server.asset(assets[0].path).blob.blob_id}"


@pytest.mark.network
@pytest.mark.parametrize(
    ("ref", "expected_version", "expected_paths"),
    [
        (f"DANDI:{DRAFT_ONLY_ID}", "draft", DRAFT_ONLY_ASSETS),
        (f"DANDI:{PUBLISHED_ID}/draft", "draft", DRAFT_ASSETS),
        (f"DANDI:{PUBLISHED_ID}/{OLD_VERSION}", OLD_VERSION, OLD_ASSETS),
        (f"DANDI:{PUBLISHED_ID}/{LATEST_VERSION}", LATEST_VERSION, LATEST_ASSETS),
    ],
)
def test_list_version_choice(dandi_server, ref, expected_version, expected_paths):
    version, assets = list_assets(ref, api_url=dandi_server.api_url)

    assert version == expected_version
    assert [asset.path for asset in assets] == sorted(expected_paths)


@pytest.mark.network
def test_list_api_url_from_environment(dandi_server, monkeypatch):
    monkeypatch.setenv("NEURPIR_DANDI_API_URL", dandi_server.api_url)

    version, _ = list_assets(f"DANDI:{DRAFT_ONLY_ID}")

    assert version == "draft"


@pytest.mark.network
@pytest.mark.parametrize(
    ("globs", "expected"),
    [
        (["sub-*/*.nwb"], sorted(set(DRAFT_ASSETS) - {PROBE_PATH})),
        (["sub-*/**.nwb"], sorted(DRAFT_ASSETS)),
        (["**/probe-?/*.nwb"], [PROBE_PATH]),
        (["sub-DT9/*", "sub-anm36*/*.nwb"], ["sub-DT9/sub-DT9_ecephys.nwb", ALM_A_PATH]),
    ],
)
def test_list_globs(dandi_server, globs, expected):
    _, assets = list_assets("DANDI:000021/draft", globs, api_url=dandi_server.api_url)

    assert [asset.path for asset in assets] == expected


@pytest.mark.network
def test_list_glob_without_match(dandi_server):
    with pytest.raises(SourceError) as info:
        list_assets("DANDI:000021/draft", ["sub-*/*.mp4"], api_url=dandi_server.api_url)

    message = str(info.value)
    assert "'sub-*/*.mp4'" in message
    assert "DANDI:000021/draft" in message
    assert "--list" in message


@pytest.mark.network
def test_list_unknown_dandiset(dandi_server):
    with pytest.raises(SourceError) as info:
        list_assets("DANDI:000999", api_url=dandi_server.api_url)

    assert "Dandiset 000999 not found" in str(info.value)
    assert dandi_server.api_url in str(info.value)


@pytest.mark.network
def test_list_unknown_version(dandi_server):
    with pytest.raises(SourceError) as info:
        list_assets("DANDI:000021/0.999999.9999", api_url=dandi_server.api_url)

    assert "version 0.999999.9999 of Dandiset 000021 not found" in str(info.value)


@pytest.mark.network
def test_list_unreachable_instance(dandi_server):
    api_url = f"http://127.0.0.1:{closed_port()}/api"

    with pytest.raises(SourceError) as info:
        list_assets("DANDI:000021", api_url=api_url)

    assert f"could not reach the DANDI instance at {api_url}" in str(info.value)


@pytest.mark.network
def test_list_spans_pages(dandi_server):
    dandi_server.max_page_size = 1

    _, assets = list_assets("DANDI:000021/draft", api_url=dandi_server.api_url)

    assert [asset.path for asset in assets] == sorted(DRAFT_ASSETS)
    pages = {record.query.get("page", "1") for record in dandi_server.listing_records()}
    assert pages == {"1", "2", "3", "4"}


@pytest.mark.network
def test_list_retries_listing_after_503(dandi_server):
    # The dandi client retries REST calls itself, and its first delay is 1.25 s.
    dandi_server.fail_listing([503])

    _, assets = list_assets("DANDI:000021/draft", api_url=dandi_server.api_url)

    assert len(assets) == len(DRAFT_ASSETS)
    assert [record.status for record in dandi_server.listing_records()] == [503, 200]


# Fetch


@pytest.mark.network
def test_fetch_writes_files_and_manifest(dandi_server, shared_data, tmp_path):
    before = datetime.now().astimezone()

    result = fetch("DANDI:000021/draft", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)

    root = tmp_path / "000021"
    assert result.dandiset_id == "000021"
    assert result.version == "draft"
    assert result.paths == [root / path for path in sorted(DRAFT_ASSETS)]
    assert result.downloaded == sorted(DRAFT_ASSETS)
    assert result.skipped == []
    for path in DRAFT_ASSETS:
        assert sha256(root / path) == sha256(source_of(shared_data, path))

    manifest = json.loads(result.manifest_path.read_text())
    assert result.manifest_path == root / MANIFEST_NAME
    assert manifest["dandiset_id"] == "000021"
    assert manifest["version"] == "draft"
    assert manifest["api_url"] == dandi_server.api_url
    assert datetime.fromisoformat(manifest["fetched_at"]) >= before.replace(microsecond=0)
    assert [entry["path"] for entry in manifest["assets"]] == sorted(DRAFT_ASSETS)
    for entry in manifest["assets"]:
        source = source_of(shared_data, entry["path"])
        served = dandi_server.asset(entry["path"])
        assert entry["asset_id"] == served.asset_id
        assert entry["size"] == source.stat().st_size
        assert entry["sha256"] == sha256(source)
        assert entry["dandi_etag"] == served.blob.etag
        assert entry["mtime_ns"] == (root / entry["path"]).stat().st_mtime_ns

    assert not (root / STAGING_DIR_NAME).exists()
    assert not list(root.glob("*.tmp"))
    assert not list(root.glob(".*.tmp"))


@pytest.mark.network
def test_fetch_latest_published_by_default(dandi_server, tmp_path):
    result = fetch("DANDI:000021", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert result.version == LATEST_VERSION
    assert result.downloaded == sorted(LATEST_ASSETS)
    assert json.loads(result.manifest_path.read_text())["version"] == LATEST_VERSION


@pytest.mark.network
def test_fetch_draft_when_unpublished(dandi_server, tmp_path):
    result = fetch(f"DANDI:{DRAFT_ONLY_ID}", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert result.version == "draft"
    assert json.loads(result.manifest_path.read_text())["version"] == "draft"


@pytest.mark.network
def test_fetch_explicit_version(dandi_server, tmp_path):
    result = fetch(f"DANDI:000021/{OLD_VERSION}", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert result.version == OLD_VERSION
    assert result.downloaded == sorted(OLD_ASSETS)
    assert files_under(tmp_path / "000021") == sorted(
        [tmp_path / "000021" / path for path in OLD_ASSETS] + [result.manifest_path, tmp_path / "000021" / LOCK_NAME]
    )


@pytest.mark.network
def test_fetch_rerun_skips_verified_files(dandi_server, tmp_path):
    fetch("DANDI:000021/draft", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)
    dandi_server.clear_records()

    result = fetch("DANDI:000021/draft", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert result.downloaded == []
    assert result.skipped == sorted(DRAFT_ASSETS)
    assert dandi_server.blob_records() == []
    assert not [record for record in dandi_server.records if record.path.endswith("/download/")]


@pytest.mark.network
def test_fetch_rerun_replaces_changed_file(dandi_server, shared_data, tmp_path):
    fetch("DANDI:000021/draft", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)
    changed = tmp_path / "000021" / ALM_A_PATH
    content = bytearray(changed.read_bytes())
    content[1000] ^= 0xFF
    changed.write_bytes(bytes(content))
    dandi_server.clear_records()

    result = fetch("DANDI:000021/draft", dest=tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert result.downloaded == [ALM_A_PATH]
    assert sha256(changed) == sha256(source_of(shared_data, ALM_A_PATH))
    assert {record.path for record in dandi_server.blob_records()} == {f"/blobs/{dandi_server.asset(ALM_A_PATH).blob.blob_id}"}


@pytest.mark.network
def test_fetch_manifest_keeps_earlier_selection(dandi_server, tmp_path):
    fetch("DANDI:000021/draft", ["sub-DT9/*.nwb"], tmp_path, api_url=dandi_server.api_url, retry=FAST)

    result = fetch("DANDI:000021/draft", [ALM_A_PATH], tmp_path, api_url=dandi_server.api_url, retry=FAST)

    manifest = json.loads(result.manifest_path.read_text())
    assert [entry["path"] for entry in manifest["assets"]] == ["sub-DT9/sub-DT9_ecephys.nwb", ALM_A_PATH]


@pytest.mark.network
def test_fetch_resumes_after_cut_connection(dandi_server, shared_data, tmp_path):
    dandi_server.cut_connection(ALM_A_PATH, after_bytes=200_000)

    result = fetch("DANDI:000021/draft", [ALM_A_PATH], tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert sha256(result.paths[0]) == sha256(source_of(shared_data, ALM_A_PATH))
    first, second = dandi_server.blob_records(ALM_A_PATH)
    assert (first.status, first.range, first.body_bytes) == (200, None, 200_000)
    # The resume starts after the last whole chunk written before the cut.
    resumed_at = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 200_000
    assert second.status == 206
    assert second.body_bytes == dandi_server.asset(ALM_A_PATH).size - resumed_at


@pytest.mark.network
def test_fetch_resumes_in_next_run(dandi_server, shared_data, tmp_path):
    dandi_server.cut_connection(ALM_A_PATH, after_bytes=200_000)
    final = tmp_path / "000021" / ALM_A_PATH

    with pytest.raises(SourceError) as info:
        fetch("DANDI:000021/draft", [ALM_A_PATH], tmp_path, api_url=dandi_server.api_url, retry=RetryPolicy(attempts=1))

    assert repr(ALM_A_PATH) in str(info.value)
    assert "run the command again to resume" in str(info.value)
    assert not final.exists()
    (partial,) = (tmp_path / "000021" / STAGING_DIR_NAME).glob("*.part")
    partial_size = partial.stat().st_size
    assert 0 < partial_size <= 200_000

    fetch("DANDI:000021/draft", [ALM_A_PATH], tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert sha256(final) == sha256(source_of(shared_data, ALM_A_PATH))
    assert dandi_server.blob_records(ALM_A_PATH)[-1].range == f"bytes={partial_size}-"
    assert not (tmp_path / "000021" / STAGING_DIR_NAME).exists()


@pytest.mark.network
def test_fetch_wrong_digest_fails_after_one_retry(dandi_server, tmp_path):
    wrong = "0" * 32 + "-1"
    dandi_server.set_metadata_etag("000021", ALM_A_PATH, wrong)

    with pytest.raises(SourceError) as info:
        fetch("DANDI:000021/draft", [ALM_A_PATH], tmp_path, api_url=dandi_server.api_url, retry=FAST)

    message = str(info.value)
    assert repr(ALM_A_PATH) in message
    assert wrong in message
    assert dandi_server.asset(ALM_A_PATH).blob.etag in message
    assert len([record for record in dandi_server.blob_records(ALM_A_PATH) if record.method == "GET"]) == 2
    assert not (tmp_path / "000021" / ALM_A_PATH).exists()
    assert not list(tmp_path.rglob("*.part"))
    manifest = json.loads((tmp_path / "000021" / MANIFEST_NAME).read_text())
    assert manifest["assets"] == []


@pytest.mark.network
@pytest.mark.parametrize("status", [503, 429])
def test_fetch_retries_after_status(dandi_server, shared_data, tmp_path, status):
    dandi_server.fail_blob(ALM_A_PATH, [status], retry_after="0")

    result = fetch("DANDI:000021/draft", [ALM_A_PATH], tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert sha256(result.paths[0]) == sha256(source_of(shared_data, ALM_A_PATH))
    assert [record.status for record in dandi_server.blob_records(ALM_A_PATH)] == [status, 200]


@pytest.mark.network
def test_fetch_gives_up_after_repeated_503(dandi_server, tmp_path):
    dandi_server.fail_blob(ALM_A_PATH, [503] * 10)

    with pytest.raises(SourceError) as info:
        fetch("DANDI:000021/draft", [ALM_A_PATH], tmp_path, api_url=dandi_server.api_url, retry=FAST)

    assert repr(ALM_A_PATH) in str(info.value)
    assert "HTTP status 503" in str(info.value)
    assert len(dandi_server.blob_records(ALM_A_PATH)) == FAST.attempts
    assert not (tmp_path / "000021" / ALM_A_PATH).exists()


@pytest.mark.network
@pytest.mark.parametrize("unsafe", ["../escape.nwb", "sub-1/../../escape.nwb", "/tmp/escape.nwb", ".neurpir-partial/x.nwb"])
def test_fetch_rejects_unsafe_path(dandi_server, shared_data, tmp_path, unsafe):
    source = standard_files(shared_data)[ALM_A]
    dandi_server.add_dandiset("000666", draft={"sub-1/sub-1_ecephys.nwb": source, unsafe: source})
    dest = tmp_path / "dest"

    with pytest.raises(SourceError) as info:
        fetch("DANDI:000666", dest=dest, api_url=dandi_server.api_url, retry=FAST)

    assert repr(unsafe) in str(info.value)
    assert not dest.exists()
    assert files_under(tmp_path) == []
    assert dandi_server.blob_records() == []


@pytest.mark.network
def test_fetch_parallel_jobs(dandi_server, shared_data, tmp_path):
    dandi_server.blob_delay_s = 0.2

    result = fetch("DANDI:000021/draft", dest=tmp_path, api_url=dandi_server.api_url, jobs=2, retry=FAST)

    assert dandi_server.max_concurrent_blob_requests == 2
    for path, local in zip(sorted(DRAFT_ASSETS), result.paths):
        assert sha256(local) == sha256(source_of(shared_data, path))


@pytest.mark.network
def test_fetch_reports_bytes(dandi_server, tmp_path):
    progress = RecordingProgress()

    fetch("DANDI:000021", dest=tmp_path, api_url=dandi_server.api_url, progress=progress, retry=FAST)

    (stage,) = progress.stages
    total = sum(dandi_server.asset(path).size for path in LATEST_ASSETS)
    assert stage["total"] == total
    assert stage["completed"][-1] == total
    assert stage["completed"] == sorted(stage["completed"])


# Streaming


@pytest.mark.network
def test_stream_units_like_local_file(dandi_server, shared_data):
    _, (asset,) = list_assets(f"DANDI:{DRAFT_ONLY_ID}", api_url=dandi_server.api_url)
    url = stream_url(asset)
    local = standard_files(shared_data)[THALAMUS]

    with open_stream(url, block_size=1 << 16) as handle, h5py.File(handle, "r") as file, NWBHDF5IO(file=file, load_namespaces=True) as io:
        units = io.read().units
        streamed = [units.get_unit_spike_times(i) for i in range(len(units))]
    with NWBHDF5IO(str(local), "r", load_namespaces=True) as io:
        units = io.read().units
        expected = [units.get_unit_spike_times(i) for i in range(len(units))]

    assert url == f"{dandi_server.base_url}/blobs/{asset.remote.blob}"
    assert len(streamed) == len(expected) == 4
    for streamed_times, expected_times in zip(streamed, expected):
        np.testing.assert_array_equal(streamed_times, expected_times)
    gets = [record for record in dandi_server.blob_records() if record.method == "GET"]
    assert len(gets) > 1
    assert all(record.status == 206 and record.range for record in gets)
    assert dandi_server.bytes_served(asset.path) <= asset.size


@pytest.mark.network
def test_stream_reads_part_of_file(dandi_server, shared_data):
    source = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    dandi_server.add_dandiset("000030", draft={"sub-1/sub-1_ophys.nwb": source})
    _, (asset,) = list_assets("DANDI:000030", api_url=dandi_server.api_url)

    with open_stream(stream_url(asset), block_size=1 << 16) as handle, h5py.File(handle, "r") as file:
        streamed = file["processing/ophys/Fluorescence/RoiResponseSeries/data"][:]
    with h5py.File(source, "r") as file:
        expected = file["processing/ophys/Fluorescence/RoiResponseSeries/data"][:]

    np.testing.assert_array_equal(streamed, expected)
    assert dandi_server.bytes_served(asset.path) < asset.size / 2


@pytest.mark.network
def test_stream_missing_url(dandi_server):
    with pytest.raises(SourceError, match="no file found at"):
        open_stream(f"{dandi_server.base_url}/blobs/00000000-0000-0000-0000-000000000000")
