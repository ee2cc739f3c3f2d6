"""``neurpir-nwb fetch`` run as a user runs it: a subprocess against a DANDI test instance on 127.0.0.1."""

import hashlib
import json
from pathlib import Path

import pytest

from tests.dandi_server import (  # noqa: F401 (dandi_server is a fixture)
    ALM_A,
    DRAFT_ASSETS,
    LATEST_ASSETS,
    LATEST_VERSION,
    closed_port,
    dandi_server,
    standard_files,
)
from tests.test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.network

ALM_A_PATH = next(path for path, name in DRAFT_ASSETS.items() if name == ALM_A)


def test_list_prints_assets_and_total(dandi_server, tmp_path):
    result = run_cli("fetch", "DANDI:000021", "--list", "--api-url", dandi_server.api_url, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert f"DANDI:000021/{LATEST_VERSION}: {len(LATEST_ASSETS)} assets" in result.stdout
    for path in LATEST_ASSETS:
        size = dandi_server.asset(path).size
        assert path in result.stdout
        assert f"{size:,}" in result.stdout
    total = sum(dandi_server.asset(path).size for path in LATEST_ASSETS)
    total_line = next(line for line in result.stdout.splitlines() if "total" in line)
    assert f"{total:,}" in total_line
    assert dandi_server.blob_records() == []
    assert not [record for record in dandi_server.records if record.path.endswith("/info/") and "/assets/" in record.path]
    assert list(tmp_path.iterdir()) == []


def test_fetch_downloads_into_default_dest(dandi_server, shared_data, tmp_path):
    result = run_cli(
        "fetch", "DANDI:000021/draft", "--path", "sub-anm*/*.nwb", "--path", "sub-DT9/*.nwb",
        "--jobs", "2", "--no-progress", "--api-url", dandi_server.api_url, cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    expected = sorted(path for path in DRAFT_ASSETS if path.startswith(("sub-anm", "sub-DT9")))
    root = tmp_path / "dandisets" / "000021"
    assert result.stdout.splitlines() == [str(Path("dandisets") / "000021" / path) for path in expected]
    for path in expected:
        source = standard_files(shared_data)[DRAFT_ASSETS[path]]
        assert hashlib.sha256((root / path).read_bytes()).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    manifest = json.loads((root / "neurpir-manifest.json").read_text())
    assert manifest["version"] == "draft"
    assert [entry["path"] for entry in manifest["assets"]] == expected


def test_fetch_api_url_from_environment(dandi_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURPIR_DANDI_API_URL", dandi_server.api_url)

    result = run_cli("fetch", "DANDI:000022", "--dest", "data", "--no-progress", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "data" / "000022").rglob("*.nwb"))) == 1


def test_bad_ref_one_error_line(tmp_path):
    result = run_cli("fetch", "DANDI:21", cwd=tmp_path)

    assert_one_line_error(result, "'DANDI:21'", "DANDI:<6-digit id>")


def test_unknown_dandiset_one_error_line(dandi_server, tmp_path):
    result = run_cli("fetch", "DANDI:000999", "--api-url", dandi_server.api_url, cwd=tmp_path)

    assert_one_line_error(result, "Dandiset 000999 not found", dandi_server.api_url)


def test_unreachable_instance_one_error_line(tmp_path):
    api_url = f"http://127.0.0.1:{closed_port()}/api"

    result = run_cli("fetch", "DANDI:000021", "--api-url", api_url, cwd=tmp_path)

    assert_one_line_error(result, f"could not reach the DANDI instance at {api_url}")


def test_digest_mismatch_one_error_line(dandi_server, tmp_path):
    wrong = "f" * 32 + "-1"
    dandi_server.set_metadata_etag("000021", ALM_A_PATH, wrong)

    result = run_cli(
        "fetch", "DANDI:000021/draft", "--path", ALM_A_PATH, "--no-progress", "--api-url", dandi_server.api_url, cwd=tmp_path
    )

    assert_one_line_error(result, ALM_A_PATH, wrong, dandi_server.asset(ALM_A_PATH).blob.etag)
    assert not (tmp_path / "dandisets" / "000021" / ALM_A_PATH).exists()
