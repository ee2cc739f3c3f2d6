"""A DANDI API instance on 127.0.0.1 for tests, serving real NWB files with switchable faults.

The server implements the REST endpoints that the dandi client (dandi 0.81) calls to
resolve an instance, look up a Dandiset and its versions, page through assets, read
asset metadata and download or stream blobs. Digests in the asset metadata are
computed from the served bytes, so a client can verify what it receives.

Glob matching follows the public archive: the ``glob`` query parameter matches the
whole path, case-insensitively, every ``*`` matches any characters including ``/``,
and every other character is literal (``?`` and ``[`` included). The client narrows
the results to its own stricter glob rules, so a test against this server checks
that the client copes with the archive's looser matching.

Each test switches on the faults it needs: a connection cut after some bytes, error
statuses before success on a blob or on the asset listing, or a wrong dandi-etag in
the metadata. A test can also add a Dandiset with any asset path, since the server
does not validate paths (``..`` included), or with no published version. The page
size cap and a delay before each blob body are settable too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

# fscacher reads DANDI_CACHE once, when dandi.support.digests is imported, so the variable
# has to be set before that import for digests to be computed afresh in every test.
os.environ.setdefault("DANDI_CACHE", "ignore")
os.environ.setdefault("DANDI_NO_ET", "1")

from dandi.support.digests import get_digest  # noqa: E402

logger = logging.getLogger(__name__)

#: Small real NWB files served by the standard Dandisets, by file name in the real-data folder.
ALM_A = "alm_sub-anm369963_ses-20170228.nwb"
ALM_B = "alm_sub-anm372793_ses-20170508.nwb"
SEPTUM = "septum_hpc_DT9_stub.nwb"
PHY = "phy_A8604-211122_unlabelled.nwb"
THALAMUS = "thalamus_sub-anm00239123_ecephys_ogen.nwb"

#: Identifiers of the standard Dandisets.
PUBLISHED_ID = "000021"
OLD_VERSION = "0.210913.1639"
LATEST_VERSION = "0.220101.1200"
DRAFT_ONLY_ID = "000022"

#: Asset paths of the standard Dandisets, mapped to the served file's name.
DRAFT_ASSETS = {
    "sub-anm369963/sub-anm369963_ses-20170228_ecephys.nwb": ALM_A,
    "sub-anm372793/sub-anm372793_ses-20170508_ecephys.nwb": ALM_B,
    "sub-DT9/sub-DT9_ecephys.nwb": SEPTUM,
    "sub-A8604/probe-1/sub-A8604_ses-211122_ecephys.nwb": PHY,
}
OLD_ASSETS = {path: name for path, name in DRAFT_ASSETS.items() if name == ALM_A}
LATEST_ASSETS = {path: name for path, name in DRAFT_ASSETS.items() if name != PHY}
DRAFT_ONLY_ASSETS = {"sub-anm00239123/sub-anm00239123_ecephys+ogen.nwb": THALAMUS}

#: Namespace of the deterministic asset and blob identifiers.
_ID_NAMESPACE = uuid.UUID("5f0e2d4c-8a53-4a8e-9a53-1d3c1f6a7b20")

_TIMESTAMP = "2022-01-01T12:00:00.000000Z"


@dataclass(frozen=True)
class Blob:
    """Bytes of one served file with their digests."""

    blob_id: str
    content: bytes
    etag: str
    sha256: str


@dataclass
class ServedAsset:
    """One asset of one version, with the digests its metadata reports."""

    asset_id: str
    path: str
    blob: Blob
    metadata_etag: str
    metadata_sha256: str | None

    @property
    def size(self) -> int:
        return len(self.blob.content)


@dataclass
class ServedVersion:
    """One version of a Dandiset: ``draft`` or a published version."""

    version: str
    status: str
    assets: list[ServedAsset]

    def summary(self, dandiset_id: str) -> dict:
        return {
            "version": self.version,
            "name": f"Test Dandiset {dandiset_id}",
            "asset_count": len(self.assets),
            "size": sum(asset.size for asset in self.assets),
            "created": _TIMESTAMP,
            "modified": _TIMESTAMP,
            "status": self.status,
        }


@dataclass
class ServedDandiset:
    """A Dandiset with its draft and published versions, oldest published version first."""

    identifier: str
    draft: ServedVersion
    published: list[ServedVersion]

    def version(self, version: str) -> ServedVersion | None:
        for candidate in [self.draft, *self.published]:
            if candidate.version == version:
                return candidate
        return None


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it, with the status and body bytes it sent back."""

    method: str
    path: str
    query: dict[str, str]
    range: str | None
    status: int
    body_bytes: int


@dataclass
class _Faults:
    #: Blob id -> (bytes sent before the connection is cut, number of requests still to cut).
    cuts: dict[str, list[int]] = field(default_factory=dict)
    #: Blob id -> statuses returned, in order, before the blob is served.
    blob_statuses: dict[str, list[int]] = field(default_factory=dict)
    #: Statuses returned, in order, before the asset listing is served.
    listing_statuses: list[int] = field(default_factory=list)
    #: Value of the Retry-After header sent with fault statuses, if any.
    retry_after: str | None = None


class DandiTestServer:
    """A threaded HTTP server on 127.0.0.1 that behaves like a small DANDI instance.

    Parameters
    ----------
    max_page_size
        Largest page of the asset listing, whatever page size the client requests.
    default_page_size
        Page size when the client requests none.
    """

    def __init__(self, *, max_page_size: int = 100, default_page_size: int = 100):
        self.max_page_size = max_page_size
        self.default_page_size = default_page_size
        #: Seconds to wait before sending each blob body, to make parallel downloads overlap.
        self.blob_delay_s = 0.0
        self.dandisets: dict[str, ServedDandiset] = {}
        self.records: list[RequestRecord] = []
        self.max_concurrent_blob_requests = 0

        self._faults = _Faults()
        self._lock = threading.Lock()
        self._blob_requests_in_flight = 0
        self._blobs_by_source: dict[Path, Blob] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle

    def start(self) -> DandiTestServer:
        handler = type("BoundHandler", (_Handler,), {"dandi": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="dandi-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> DandiTestServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "the server is not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api"

    # Content

    def add_dandiset(
        self,
        identifier: str,
        draft: dict[str, Path],
        published: dict[str, dict[str, Path]] | None = None,
    ) -> ServedDandiset:
        """Serve a Dandiset whose versions map asset paths to real files.

        ``published`` maps version ids, oldest first, to their assets; the last one is the
        most recent published version.
        """
        published = published or {}
        dandiset = ServedDandiset(
            identifier=identifier,
            draft=ServedVersion("draft", "Valid", self._assets(identifier, draft)),
            published=[
                ServedVersion(version, "Published", self._assets(identifier, assets))
                for version, assets in published.items()
            ],
        )
        self.dandisets[identifier] = dandiset
        return dandiset

    def _assets(self, dandiset_id: str, files: dict[str, Path]) -> list[ServedAsset]:
        assets = []
        for path, source in files.items():
            blob = self._blob(source)
            asset_id = str(uuid.uuid5(_ID_NAMESPACE, f"{dandiset_id}/{path}/{blob.sha256}"))
            assets.append(ServedAsset(asset_id, path, blob, blob.etag, blob.sha256))
        return assets

    def _blob(self, source: Path) -> Blob:
        source = Path(source)
        if source not in self._blobs_by_source:
            content = source.read_bytes()
            sha256 = hashlib.sha256(content).hexdigest()
            self._blobs_by_source[source] = Blob(
                blob_id=str(uuid.uuid5(_ID_NAMESPACE, sha256)),
                content=content,
                etag=get_digest(source, "dandi-etag"),
                sha256=sha256,
            )
        return self._blobs_by_source[source]

    def asset(self, path: str, dandiset_id: str | None = None) -> ServedAsset:
        """Return the first served asset with this path, in the given Dandiset or in any."""
        for dandiset in self.dandisets.values():
            if dandiset_id is not None and dandiset.identifier != dandiset_id:
                continue
            for version in [dandiset.draft, *dandiset.published]:
                for asset in version.assets:
                    if asset.path == path:
                        return asset
        raise KeyError(f"no served asset has the path {path!r}")

    def _find_asset(self, asset_id: str) -> ServedAsset | None:
        for dandiset in self.dandisets.values():
            for version in [dandiset.draft, *dandiset.published]:
                for asset in version.assets:
                    if asset.asset_id == asset_id:
                        return asset
        return None

    def _find_blob(self, blob_id: str) -> Blob | None:
        for blob in self._blobs_by_source.values():
            if blob.blob_id == blob_id:
                return blob
        return None

    # Faults

    def cut_connection(self, path: str, after_bytes: int, times: int = 1) -> None:
        """Close the connection after ``after_bytes`` body bytes on the next ``times`` requests of this asset's blob."""
        with self._lock:
            self._faults.cuts[self.asset(path).blob.blob_id] = [after_bytes, times]

    def fail_blob(self, path: str, statuses: list[int], retry_after: str | None = None) -> None:
        """Return ``statuses``, in order, to the next requests of this asset's blob before serving it."""
        with self._lock:
            self._faults.blob_statuses[self.asset(path).blob.blob_id] = list(statuses)
            self._faults.retry_after = retry_after

    def fail_listing(self, statuses: list[int]) -> None:
        """Return ``statuses``, in order, to the next asset-listing requests."""
        with self._lock:
            self._faults.listing_statuses = list(statuses)

    def set_metadata_etag(self, dandiset_id: str, path: str, etag: str) -> None:
        """Report ``etag`` as the dandi-etag of the asset at ``path`` in every version of the Dandiset."""
        dandiset = self.dandisets[dandiset_id]
        for version in [dandiset.draft, *dandiset.published]:
            for asset in version.assets:
                if asset.path == path:
                    asset.metadata_etag = etag

    # Request log

    def clear_records(self) -> None:
        with self._lock:
            self.records.clear()

    def blob_records(self, path: str | None = None) -> list[RequestRecord]:
        """Return the requests of blob bodies, of one asset's blob when ``path`` is given."""
        prefix = "/blobs/" if path is None else f"/blobs/{self.asset(path).blob.blob_id}"
        with self._lock:
            return [record for record in self.records if record.path.startswith(prefix)]

    def listing_records(self) -> list[RequestRecord]:
        with self._lock:
            return [record for record in self.records if record.path.endswith("/assets/")]

    def bytes_served(self, path: str) -> int:
        """Return the body bytes sent for this asset's blob, over all requests."""
        return sum(record.body_bytes for record in self.blob_records(path) if record.method == "GET")

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.records.append(record)

    # Fault state used by the handler

    def _take_cut(self, blob_id: str) -> int | None:
        with self._lock:
            cut = self._faults.cuts.get(blob_id)
            if cut is None or cut[1] <= 0:
                return None
            cut[1] -= 1
            return cut[0]

    def _take_blob_status(self, blob_id: str) -> int | None:
        with self._lock:
            statuses = self._faults.blob_statuses.get(blob_id)
            return statuses.pop(0) if statuses else None

    def _take_listing_status(self) -> int | None:
        with self._lock:
            statuses = self._faults.listing_statuses
            return statuses.pop(0) if statuses else None

    def _enter_blob(self) -> None:
        with self._lock:
            self._blob_requests_in_flight += 1
            self.max_concurrent_blob_requests = max(self.max_concurrent_blob_requests, self._blob_requests_in_flight)

    def _leave_blob(self) -> None:
        with self._lock:
            self._blob_requests_in_flight -= 1


def glob_regex(pattern: str) -> re.Pattern:
    """Translate a glob the way the public archive does: ``*`` matches anything, case-insensitively."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", ".*") + "$", re.IGNORECASE)


_ASSET = r"(?P<asset_id>[0-9a-f-]{36})"
_VERSION = r"/api/dandisets/(?P<dandiset_id>\d{6})/versions/(?P<version>[^/]+)"
_ROUTES = [
    ("server_info", re.compile(r"/server-info")),
    ("info", re.compile(r"/api/info/?")),
    ("dandiset", re.compile(r"/api/dandisets/(?P<dandiset_id>\d{6})/?")),
    ("version_metadata", re.compile(_VERSION + r"/?")),
    ("version_info", re.compile(_VERSION + r"/info/?")),
    ("assets", re.compile(_VERSION + r"/assets/?")),
    ("asset_metadata", re.compile(_VERSION + r"/assets/" + _ASSET + r"/?")),
    ("asset_info", re.compile(_VERSION + r"/assets/" + _ASSET + r"/info/?")),
    ("download", re.compile(_VERSION + r"/assets/" + _ASSET + r"/download/?")),
    ("asset_metadata", re.compile(r"/api/assets/" + _ASSET + r"/?")),
    ("asset_info", re.compile(r"/api/assets/" + _ASSET + r"/info/?")),
    ("download", re.compile(r"/api/assets/" + _ASSET + r"/download/?")),
    ("blob", re.compile(r"/blobs/(?P<blob_id>[0-9a-f-]{36})")),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    dandi: DandiTestServer

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        self.query = dict(parse_qsl(url.query, keep_blank_values=True))
        self.query_pairs = parse_qsl(url.query, keep_blank_values=True)
        self.head = head
        for name, pattern in _ROUTES:
            match = pattern.fullmatch(url.path)
            if match:
                getattr(self, f"_{name}")(**match.groupdict())
                return
        self._send_json({"detail": "Not found."}, status=404)

    # Responses

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, cut_after: int | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

        sent = 0
        if not self.head:
            if cut_after is not None and cut_after < len(body):
                # Send part of the body, then drop the connection as a failing network would.
                self.wfile.write(body[:cut_after])
                self.wfile.flush()
                sent = cut_after
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.wfile.write(body)
                sent = len(body)

        url = urlsplit(self.path)
        self.dandi._record(
            RequestRecord(self.command, url.path, dict(self.query), self.headers.get("Range"), status, sent)
        )

    def _send_json(self, payload, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json"})

    def _send_fault(self, status: int) -> None:
        headers = {"Content-Type": "application/json"}
        if self.dandi._faults.retry_after is not None:
            headers["Retry-After"] = self.dandi._faults.retry_after
        self._send(status, json.dumps({"detail": f"fault status {status}"}).encode(), headers)

    def _not_found(self) -> None:
        self._send_json({"detail": "Not found."}, status=404)

    # Lookups

    def _version(self, dandiset_id: str, version: str) -> tuple[ServedDandiset, ServedVersion] | None:
        dandiset = self.dandi.dandisets.get(dandiset_id)
        if dandiset is None:
            return None
        served_version = dandiset.version(version)
        if served_version is None:
            return None
        return dandiset, served_version

    def _asset_fields(self, asset: ServedAsset) -> dict:
        return {
            "asset_id": asset.asset_id,
            "blob": asset.blob.blob_id,
            "zarr": None,
            "path": asset.path,
            "size": asset.size,
            "created": _TIMESTAMP,
            "modified": _TIMESTAMP,
        }

    def _metadata_dict(self, asset: ServedAsset) -> dict:
        digest = {"dandi:dandi-etag": asset.metadata_etag}
        if asset.metadata_sha256 is not None:
            digest["dandi:sha2-256"] = asset.metadata_sha256
        return {
            "id": f"dandiasset:{asset.asset_id}",
            "identifier": asset.asset_id,
            "schemaKey": "Asset",
            "path": asset.path,
            "contentSize": asset.size,
            "encodingFormat": "application/x-nwb",
            "digest": digest,
            "contentUrl": [
                f"{self.dandi.api_url}/assets/{asset.asset_id}/download/",
                f"{self.dandi.base_url}/blobs/{asset.blob.blob_id}",
            ],
            "blobDateModified": _TIMESTAMP,
            "dateModified": _TIMESTAMP,
        }

    # Endpoints

    def _server_info(self) -> None:
        self._not_found()

    def _info(self) -> None:
        self._send_json(
            {
                "version": "0.0.0",
                "services": {"api": {"url": self.dandi.api_url}, "webui": {"url": self.dandi.base_url}},
                "cli-minimal-version": "0.0.0",
                "cli-bad-versions": [],
            }
        )

    def _dandiset(self, dandiset_id: str) -> None:
        dandiset = self.dandi.dandisets.get(dandiset_id)
        if dandiset is None:
            self._not_found()
            return
        latest = dandiset.published[-1].summary(dandiset_id) if dandiset.published else None
        self._send_json(
            {
                "identifier": dandiset_id,
                "created": _TIMESTAMP,
                "modified": _TIMESTAMP,
                "contact_person": "Doe, Jane",
                "embargo_status": "OPEN",
                "most_recent_published_version": latest,
                "draft_version": dandiset.draft.summary(dandiset_id),
            }
        )

    def _version_metadata(self, dandiset_id: str, version: str) -> None:
        found = self._version(dandiset_id, version)
        if found is None:
            self._not_found()
            return
        self._send_json(
            {
                "schemaKey": "Dandiset",
                "identifier": f"DANDI:{dandiset_id}",
                "id": f"DANDI:{dandiset_id}/{version}",
                "name": f"Test Dandiset {dandiset_id}",
                "version": version,
            }
        )

    def _version_info(self, dandiset_id: str, version: str) -> None:
        found = self._version(dandiset_id, version)
        if found is None:
            self._not_found()
            return
        summary = found[1].summary(dandiset_id)
        self._send_json({**summary, "asset_validation_errors": [], "version_validation_errors": []})

    def _assets(self, dandiset_id: str, version: str) -> None:
        status = self.dandi._take_listing_status()
        if status is not None:
            self._send_fault(status)
            return
        found = self._version(dandiset_id, version)
        if found is None:
            self._not_found()
            return
        assets = list(found[1].assets)

        if "glob" in self.query:
            pattern = glob_regex(self.query["glob"])
            assets = [asset for asset in assets if pattern.match(asset.path)]
        if "path" in self.query:
            prefix = self.query["path"].lower()
            assets = [asset for asset in assets if asset.path.lower().startswith(prefix)]
        order = self.query.get("order") or "created"
        if order.lstrip("-") == "path":
            assets.sort(key=lambda asset: asset.path, reverse=order.startswith("-"))

        page = int(self.query.get("page", "1"))
        page_size = min(int(self.query.get("page_size", self.dandi.default_page_size)), self.dandi.max_page_size)
        start = (page - 1) * page_size
        results = assets[start : start + page_size]

        def page_url(number: int) -> str:
            pairs = [(key, value) for key, value in self.query_pairs if key != "page"] + [("page", str(number))]
            return f"{self.dandi.base_url}{urlsplit(self.path).path}?{urlencode(pairs)}"

        self._send_json(
            {
                "count": len(assets),
                "next": page_url(page + 1) if start + page_size < len(assets) else None,
                "previous": page_url(page - 1) if page > 1 else None,
                "results": [self._asset_fields(asset) for asset in results],
            }
        )

    def _lookup_asset(self, asset_id: str, dandiset_id: str | None, version: str | None) -> ServedAsset | None:
        if dandiset_id is None:
            return self.dandi._find_asset(asset_id)
        found = self._version(dandiset_id, version)
        if found is None:
            return None
        return next((asset for asset in found[1].assets if asset.asset_id == asset_id), None)

    def _asset_metadata(self, asset_id: str, dandiset_id: str | None = None, version: str | None = None) -> None:
        asset = self._lookup_asset(asset_id, dandiset_id, version)
        if asset is None:
            self._not_found()
            return
        self._send_json(self._metadata_dict(asset))

    def _asset_info(self, asset_id: str, dandiset_id: str | None = None, version: str | None = None) -> None:
        asset = self._lookup_asset(asset_id, dandiset_id, version)
        if asset is None:
            self._not_found()
            return
        self._send_json({**self._asset_fields(asset), "metadata": self._metadata_dict(asset)})

    def _download(self, asset_id: str, dandiset_id: str | None = None, version: str | None = None) -> None:
        asset = self._lookup_asset(asset_id, dandiset_id, version)
        if asset is None:
            self._not_found()
            return
        # The archive redirects to a presigned URL, so a query takes the place of the signature.
        location = f"{self.dandi.base_url}/blobs/{asset.blob.blob_id}?signature=test"
        self._send(302, b"", {"Location": location})

    def _blob(self, blob_id: str) -> None:
        blob = self.dandi._find_blob(blob_id)
        if blob is None:
            self._not_found()
            return
        if not self.head:
            status = self.dandi._take_blob_status(blob_id)
            if status is not None:
                self._send_fault(status)
                return

        self.dandi._enter_blob()
        try:
            if self.dandi.blob_delay_s and not self.head:
                time.sleep(self.dandi.blob_delay_s)
            self._send_blob(blob)
        finally:
            self.dandi._leave_blob()

    def _send_blob(self, blob: Blob) -> None:
        size = len(blob.content)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        requested = self.headers.get("Range")
        if requested is None:
            cut_after = None if self.head else self.dandi._take_cut(blob.blob_id)
            self._send(200, blob.content, headers, cut_after=cut_after)
            return

        byte_range = _parse_range(requested, size)
        if byte_range is None:
            self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            return
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        cut_after = None if self.head else self.dandi._take_cut(blob.blob_id)
        self._send(206, blob.content[start : end + 1], headers, cut_after=cut_after)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the first byte and the last byte of a single ``bytes=`` range, or None when unsatisfiable."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return None
    return start, end


def closed_port() -> int:
    """Return a port on 127.0.0.1 with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def standard_files(shared_data: Path) -> dict[str, Path]:
    """Return the real NWB files used by the standard Dandisets, by file name."""
    folder = shared_data / "nwb" / "real"
    return {name: folder / name for name in (ALM_A, ALM_B, SEPTUM, PHY, THALAMUS)}


def add_standard_dandisets(server: DandiTestServer, shared_data: Path) -> None:
    """Serve Dandiset 000021 with two published versions and a draft, and the draft-only Dandiset 000022."""
    files = standard_files(shared_data)

    def resolve(assets: dict[str, str]) -> dict[str, Path]:
        return {path: files[name] for path, name in assets.items()}

    server.add_dandiset(
        PUBLISHED_ID,
        draft=resolve(DRAFT_ASSETS),
        published={OLD_VERSION: resolve(OLD_ASSETS), LATEST_VERSION: resolve(LATEST_ASSETS)},
    )
    server.add_dandiset(DRAFT_ONLY_ID, draft=resolve(DRAFT_ONLY_ASSETS))


@pytest.fixture
def dandi_server(shared_data, monkeypatch) -> Iterator[DandiTestServer]:
    """A running test instance serving the standard Dandisets, with fast retries for downloads."""
    monkeypatch.setenv("DANDI_CACHE", "ignore")
    monkeypatch.setenv("DANDI_NO_ET", "1")
    monkeypatch.setenv("NEURPIR_DANDI_RETRY_DELAY_S", "0.01")
    monkeypatch.delenv("NEURPIR_DANDI_API_URL", raising=False)

    with DandiTestServer() as server:
        add_standard_dandisets(server, shared_data)
        yield server
