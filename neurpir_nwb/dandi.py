"""DANDI references, asset listing, verified downloads and HTTP streaming.

A reference names a Dandiset and optionally a version: ``DANDI:000021``,
``DANDI:000021/draft`` or ``DANDI:000021/0.210913.1639``. Without a version the most
recent published version is used, and the draft when nothing is published.

All REST calls go through the dandi client (:class:`dandi.dandiapi.DandiAPIClient`),
which retries 429 and 5xx responses and dropped connections itself (12 attempts with
exponential backoff, in dandi 0.81). Blob bodies are fetched through the same client's
HTTP session with ``Range`` requests, and the retries for them are added here.

Downloads go to ``DEST/<dandiset id>/<asset path>``. Each file is first written to
``DEST/<dandiset id>/.neurpir-partial/<asset id>.part``, where an interrupted download
resumes, and is moved to its final path only after its dandi-etag (and its SHA-256,
when the asset metadata has one) matches the metadata. The files in a dandiset
folder, their digests and the version they came from are recorded in
``DEST/<dandiset id>/neurpir-manifest.json``. A lock file,
``DEST/<dandiset id>/.neurpir-fetch.lock``, keeps two fetches from writing the same
folder at once.

A file already in place is skipped without reading it when its size and
modification time (in nanoseconds) equal those that the manifest records for the
same dandi-etag. Any other file already in place is checked by its digests.

Environment variables: ``NEURPIR_DANDI_API_URL`` sets the DANDI instance when no
``api_url`` is given, and ``NEURPIR_DANDI_RETRY_DELAY_S`` sets the first delay, in
seconds, before a blob request is retried.
"""

from __future__ import annotations

import os

# The dandi client checks for a newer release of itself over the network unless this is set.
os.environ.setdefault("DANDI_NO_ET", "1")

import json
import logging
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

import fasteners
import requests
from dandi.dandiapi import DandiAPIClient, RemoteBlobAsset, RemoteDandiset
from dandi.exceptions import CliVersionError, NotFoundError
from dandi.utils import get_retry_after

from neurpir_nwb.errors import SourceError
from neurpir_nwb.progress import Progress, SilentProgress

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_DEST",
    "MANIFEST_NAME",
    "AssetInfo",
    "DandiRef",
    "FetchResult",
    "RetryPolicy",
    "fetch",
    "list_assets",
    "open_stream",
    "parse_dandi_ref",
    "resolve_api_url",
    "stream_url",
]

logger = logging.getLogger(__name__)

#: REST API of the public DANDI archive.
DEFAULT_API_URL = "https://api.dandiarchive.org/api"
API_URL_ENV = "NEURPIR_DANDI_API_URL"
RETRY_DELAY_ENV = "NEURPIR_DANDI_RETRY_DELAY_S"

#: Folder that receives one subfolder per Dandiset when no destination is given.
DEFAULT_DEST = Path("dandisets")
MANIFEST_NAME = "neurpir-manifest.json"
STAGING_DIR_NAME = ".neurpir-partial"
LOCK_NAME = ".neurpir-fetch.lock"
MANIFEST_FORMAT = 1

#: HTTP statuses after which a blob request is retried. The dandi client retries the same statuses for REST calls.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Maximum wait, in seconds, that a server's Retry-After header can impose before a blob request is retried.
MAX_RETRY_AFTER_S = 600.0
#: Seconds to wait for the server to connect or send the next bytes, as in the dandi client.
DOWNLOAD_TIMEOUT_S = 30.0
#: Bytes read per write. A dropped connection loses at most the chunk being read, and a resume fetches it again.
CHUNK_SIZE = 1 << 16
#: Bytes fetched per range request when streaming. The blocks stay cached while the file is open.
STREAM_BLOCK_SIZE = 1 << 20
#: Parallel requests for asset metadata, one request per asset.
METADATA_WORKERS = 8

_REF_PATTERN = re.compile(r"DANDI:(?P<dandiset_id>\d{6})(?:/(?P<version>draft|\d+\.\d{6}\.\d{4}))?", re.IGNORECASE)
_ACCEPTED_REFS = "DANDI:<6-digit id>, DANDI:<id>/draft or DANDI:<id>/<published version>, such as DANDI:000021/0.210913.1639"


# References


@dataclass(frozen=True)
class DandiRef:
    """A Dandiset and, optionally, one of its versions (``draft`` or a published version id)."""

    dandiset_id: str
    version: str | None = None

    def __str__(self) -> str:
        if self.version is None:
            return f"DANDI:{self.dandiset_id}"
        return f"DANDI:{self.dandiset_id}/{self.version}"


def parse_dandi_ref(text: str) -> DandiRef:
    """Parse ``DANDI:<id>[/<version>]`` without contacting any server.

    Raises
    ------
    SourceError
        When the text is not one of the accepted forms.
    """
    match = _REF_PATTERN.fullmatch(text.strip())
    if match is None:
        raise SourceError(f"invalid DANDI reference {text!r}; expected {_ACCEPTED_REFS}")
    version = match.group("version")
    if version is not None and version.lower() == "draft":
        version = "draft"
    return DandiRef(match.group("dandiset_id"), version)


def _as_ref(ref: DandiRef | str) -> DandiRef:
    return ref if isinstance(ref, DandiRef) else parse_dandi_ref(ref)


def resolve_api_url(api_url: str | None = None) -> str:
    """Return ``api_url``, else ``$NEURPIR_DANDI_API_URL``, else the public archive, without a trailing slash."""
    url = api_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL
    if not url.lower().startswith(("http://", "https://")):
        raise SourceError(
            f"invalid DANDI API URL {url!r}; expected an http:// or https:// URL such as {DEFAULT_API_URL}"
        )
    return url.rstrip("/")


# Asset path globs


def _glob_regex(pattern: str) -> re.Pattern:
    """Translate an asset path glob into a regular expression for the whole path.

    ``*`` matches any characters except ``/``, ``**`` matches any characters including
    ``/``, ``**/`` also matches no folder at all, ``?`` matches one character except
    ``/`` and ``[...]`` (``[!...]`` to negate) matches one character of a set.
    Matching is case-sensitive.
    """
    parts = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := _class_end(pattern, i)) is not None:
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            body = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            parts.append(f"(?!/)[{'^' if negate else ''}{body}]")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


def _class_end(pattern: str, start: int) -> int | None:
    """Return the index of the ``]`` that closes the set opened at ``start``, or None."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "!":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    end = pattern.find("]", i)
    return end if end >= 0 else None


def _server_glob(pattern: str) -> str:
    """Return a glob for the server's ``?glob=`` that matches at least what ``pattern`` matches.

    The archive matches case-insensitively and treats ``*`` as any characters,
    ``/`` included, and every other character literally. So each wildcard becomes
    ``*`` and the exact match is left to :func:`_glob_regex`.
    """
    loose = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            token_length = 3
        elif pattern[i] in "*?":
            token_length = 1
        elif pattern[i] == "[" and (end := _class_end(pattern, i)) is not None:
            token_length = end - i + 1
        else:
            loose.append(pattern[i])
            i += 1
            continue
        if not loose or loose[-1] != "*":
            loose.append("*")
        i += token_length
    return "".join(loose)


# Listing


@dataclass(frozen=True)
class AssetInfo:
    """One blob asset of a Dandiset version, with the digests from its metadata.

    ``remote`` is the dandi client's asset, kept for :func:`stream_url`. It is None
    for an AssetInfo built by hand.
    """

    asset_id: str
    path: str
    size: int
    etag: str | None
    sha256: str | None
    remote: RemoteBlobAsset | None = field(default=None, compare=False, repr=False)


@contextmanager
def _api_errors(api_url: str, subject: str) -> Iterator[None]:
    """Turn the dandi client's network and HTTP failures into a SourceError about ``subject``.

    NOTE: the client's own retries of REST calls wait about 50 s in all before it
    gives up, and that delay cannot be set from here.
    """
    try:
        yield
    except NotFoundError as error:
        raise SourceError(f"{subject} not found at {api_url} ({error}); run the command again") from error
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else "unknown"
        raise SourceError(
            f"the DANDI instance at {api_url} returned HTTP status {status} for {subject}, "
            "also after the client's retries; try again later"
        ) from error
    except requests.RequestException as error:
        raise SourceError(
            f"could not connect to the DANDI instance at {api_url} for {subject} ({error}); "
            f"check the network connection, --api-url and {API_URL_ENV}"
        ) from error


def _open_client(api_url: str) -> DandiAPIClient:
    try:
        return DandiAPIClient(api_url=api_url)
    except CliVersionError as error:
        raise SourceError(f"the DANDI instance at {api_url} rejects this dandi client ({error}); upgrade the dandi package") from error
    except RuntimeError as error:
        # The client raises RuntimeError when neither /server-info nor /api/info/ responds at an unknown URL.
        raise SourceError(
            f"could not reach the DANDI instance at {api_url} ({error}); "
            f"check the network connection, --api-url and {API_URL_ENV}"
        ) from error


def _open_dandiset(client: DandiAPIClient, ref: DandiRef, api_url: str) -> RemoteDandiset:
    """Return the Dandiset at the requested version, or the latest published version, else the draft."""
    with _api_errors(api_url, str(ref)):
        try:
            dandiset = client.get_dandiset(ref.dandiset_id, lazy=False)
        except NotFoundError as error:
            raise SourceError(
                f"Dandiset {ref.dandiset_id} not found at {api_url}; check the identifier in {ref}, "
                f"or point --api-url at the instance that holds it"
            ) from error

        if ref.version is None or ref.version == dandiset.version_id:
            return dandiset
        if ref.version == "draft":
            return dandiset.for_version(dandiset.draft_version)
        try:
            return dandiset.for_version(ref.version)
        except NotFoundError as error:
            raise SourceError(
                f"version {ref.version} of Dandiset {ref.dandiset_id} not found at {api_url}; "
                f"use DANDI:{ref.dandiset_id} for the latest published version or DANDI:{ref.dandiset_id}/draft"
            ) from error


def _list_remote(dandiset: RemoteDandiset, ref: DandiRef, globs: Sequence[str], api_url: str) -> list:
    """Return the dandi client's assets of the version that match any glob, or all assets without globs."""
    label = f"DANDI:{dandiset.identifier}/{dandiset.version_id}"
    with _api_errors(api_url, f"the asset list of {label}"):
        if not globs:
            assets = list(dandiset.get_assets(order="path"))
            _check_listing_count(dandiset, len(assets), label)
            if not assets:
                raise SourceError(f"{label} has no assets; choose another version of {ref.dandiset_id}")
            return assets

        # NOTE: unlike the full listing, glob listings are not checked against a count from the server.
        selected: dict[str, Any] = {}
        unmatched = []
        for pattern in globs:
            if not pattern:
                raise SourceError("invalid empty --path glob; give a glob such as 'sub-*/*.nwb'")
            regex = _glob_regex(pattern)
            matches = [
                asset
                for asset in dandiset.get_assets_by_glob(_server_glob(pattern), order="path")
                if regex.fullmatch(asset.path)
            ]
            if not matches:
                unmatched.append(pattern)
            for asset in matches:
                selected[asset.identifier] = asset

    if not selected:
        quoted = ", ".join(repr(pattern) for pattern in globs)
        raise SourceError(
            f"no asset of {label} matches --path {quoted}; list the assets with "
            f"`neurpir-nwb fetch {label} --list` (in globs, * stays within one folder and ** crosses folders)"
        )
    for pattern in unmatched:
        logger.warning("--path %r matches no asset of %s", pattern, label)
    return sorted(selected.values(), key=lambda asset: asset.path)


def _check_listing_count(dandiset: RemoteDandiset, received: int, label: str) -> None:
    """Compare the assets received with the count the version reports, since a dandi client user reported a listing that stopped early."""
    expected = dandiset.version.asset_count
    if received == expected:
        return
    if dandiset.version_id == "draft":
        # A draft can change between the version lookup and the listing, so a mismatch is only logged.
        logger.warning("%s: received %d assets but the version reports %d", label, received, expected)
        return
    raise SourceError(
        f"the asset list of {label} is incomplete: received {received} assets but the version has {expected}; run the command again"
    )


def _asset_info(dandiset: RemoteDandiset, listed, label: str, metadata: bool) -> AssetInfo:
    """Return the AssetInfo of a listed asset, fetching its metadata for the digests when ``metadata`` is true."""
    if not isinstance(listed, RemoteBlobAsset):
        raise SourceError(
            f"asset {listed.path!r} of {label} is a Zarr asset, which fetch cannot download; "
            "exclude it with a narrower --path"
        )
    if not metadata:
        return AssetInfo(listed.identifier, listed.path, listed.size, etag=None, sha256=None, remote=listed)

    try:
        remote = dandiset.get_asset(listed.identifier)
    except NotFoundError as error:
        raise SourceError(f"asset {listed.path!r} of {label} disappeared while listing; run the command again") from error
    digest = remote.get_raw_metadata().get("digest", {})
    return AssetInfo(
        asset_id=remote.identifier,
        path=remote.path,
        size=remote.size,
        etag=digest.get("dandi:dandi-etag"),
        sha256=digest.get("dandi:sha2-256"),
        remote=remote,
    )


def _list(
    client: DandiAPIClient, ref: DandiRef, globs: Sequence[str], api_url: str, metadata: bool = True
) -> tuple[str, list[AssetInfo]]:
    dandiset = _open_dandiset(client, ref, api_url)
    label = f"DANDI:{dandiset.identifier}/{dandiset.version_id}"
    listed = _list_remote(dandiset, ref, globs, api_url)
    logger.info("%s: %d assets selected", label, len(listed))

    with _api_errors(api_url, f"the asset metadata of {label}"):
        with ThreadPoolExecutor(max_workers=min(METADATA_WORKERS, len(listed))) as pool:
            assets = list(pool.map(lambda asset: _asset_info(dandiset, asset, label, metadata), listed))
    return dandiset.version_id, assets


def list_assets(
    ref: DandiRef | str, globs: Sequence[str] = (), api_url: str | None = None, *, metadata: bool = True
) -> tuple[str, list[AssetInfo]]:
    """List the assets of a Dandiset version that match any of ``globs`` (all assets when empty).

    With ``metadata`` true, each asset's metadata is fetched (one request per asset)
    for its digests. Otherwise ``etag`` and ``sha256`` are None.

    Returns
    -------
    tuple
        The version used and the assets, sorted by path.

    Raises
    ------
    SourceError
        For an unknown Dandiset or version, no matching asset, a Zarr asset or an unreachable instance.
    """
    ref = _as_ref(ref)
    api_url = resolve_api_url(api_url)

    # The client stays open because each AssetInfo keeps it for stream_url.
    client = _open_client(api_url)
    return _list(client, ref, globs, api_url, metadata)


# Local paths


def _unsafe_reason(root: Path, path: str) -> str | None:
    """Return why ``path`` may not be written under ``root``, or None when it is safe."""
    posix = PurePosixPath(path)
    if not path or path.startswith("/") or posix.is_absolute():
        return "absolute path" if path else "empty path"
    if "\\" in path:
        return "contains a backslash"
    if ".." in posix.parts:
        return "contains a '..' component"
    if posix.parts[0] in (STAGING_DIR_NAME, MANIFEST_NAME, LOCK_NAME):
        return "uses a name reserved for fetch's own files"
    resolved = (root / path).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        return "resolves outside the dandiset folder"
    return None


def _check_local_paths(root: Path, assets: Iterable[AssetInfo], label: str) -> None:
    resolved_root = root.resolve()
    problems = []
    for asset in assets:
        reason = _unsafe_reason(resolved_root, asset.path)
        if reason is not None:
            problems.append(f"{asset.path!r} ({reason})")
    if problems:
        raise SourceError(
            f"{label} has asset paths that cannot be written under {root}: {', '.join(problems)}; "
            "nothing was downloaded, so exclude them with a narrower --path"
        )


# Digests


@dataclass(frozen=True)
class _Mismatch:
    digest: str
    expected: str
    actual: str


def _find_mismatch(path: Path, asset: AssetInfo) -> _Mismatch | None:
    """Compare the file's dandi-etag, and its SHA-256 when the metadata has one, with the asset metadata."""
    from dandi.support.digests import get_digest

    if asset.etag is not None:
        actual = get_digest(path, "dandi-etag")
        if actual != asset.etag:
            return _Mismatch("dandi-etag", asset.etag, actual)
    if asset.sha256 is not None:
        actual = get_digest(path, "sha256")
        if actual != asset.sha256:
            return _Mismatch("sha256", asset.sha256, actual)
    return None


def _require_digest(asset: AssetInfo, label: str) -> None:
    if asset.etag is None and asset.sha256 is None:
        raise SourceError(
            f"asset {asset.path!r} of {label} has no dandi-etag or sha256 digest in its metadata, "
            "so a download cannot be verified; exclude it with a narrower --path"
        )


# Manifest


def _manifest_entry(asset: AssetInfo, path: Path) -> dict:
    stat = path.stat()
    return {
        "asset_id": asset.asset_id,
        "path": asset.path,
        "size": asset.size,
        "dandi_etag": asset.etag,
        "sha256": asset.sha256,
        "mtime_ns": stat.st_mtime_ns,
    }


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable manifest %s (%s); every file will be checked by its digest", path, error)
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("assets"), list):
        logger.warning("ignoring manifest %s without an assets list; every file will be checked by its digest", path)
        return None
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    """Write the manifest to a temporary file beside it and rename it, so readers never see half a file."""
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


# Downloads


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before a failed blob request is retried.

    A failure counts towards ``attempts`` only while no bytes arrive; a request that
    received bytes before it failed starts the count again. The delay before retry n
    is ``initial_delay_s * 2 ** (n - 1)``, at most ``max_delay_s`` in seconds, and at
    least the server's ``Retry-After`` up to :data:`MAX_RETRY_AFTER_S`.
    """

    attempts: int = 6
    initial_delay_s: float = 1.0
    max_delay_s: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Return the default policy with the first delay from ``$NEURPIR_DANDI_RETRY_DELAY_S`` when set."""
        text = os.environ.get(RETRY_DELAY_ENV)
        if not text:
            return cls()
        try:
            delay_s = float(text)
        except ValueError:
            raise SourceError(f"invalid {RETRY_DELAY_ENV}={text!r}; expected a number of seconds such as 1.0") from None
        return cls(initial_delay_s=delay_s)

    def delay_s(self, failures: int, retry_after_s: float | None = None) -> float:
        delay = min(self.initial_delay_s * 2 ** (failures - 1), self.max_delay_s)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
        return delay


@dataclass(frozen=True)
class FetchResult:
    """The outcome of :func:`fetch`: the version used and the verified local files, in asset path order."""

    dandiset_id: str
    version: str
    paths: list[Path]
    manifest_path: Path
    downloaded: list[str]
    skipped: list[str]


class _Cancelled(Exception):
    """Another download of the same fetch failed, so this one stops."""


class _ByteCounter:
    """Sum of the bytes present for each file, reported to a progress bar from several threads."""

    def __init__(self, advance: Callable[[int], None]):
        self._advance = advance
        self._done: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def set(self, key: str, done: int) -> None:
        with self._lock:
            self._total += done - self._done.get(key, 0)
            self._done[key] = done
            self._advance(self._total)

    def add(self, key: str, received: int) -> None:
        with self._lock:
            done = self._done.get(key, 0) + received
            self._total += received
            self._done[key] = done
            self._advance(self._total)


@dataclass
class _Download:
    """Everything one fetch needs to download and verify its files."""

    label: str
    root: Path
    staging: Path
    retry: RetryPolicy
    counter: _ByteCounter
    stop: threading.Event

    def run(self, asset: AssetInfo) -> dict:
        """Download, verify and move one asset into place, and return its manifest entry.

        A file that fails verification is deleted and downloaded once more from the
        start. A second failure raises SourceError.
        """
        part = self.staging / f"{asset.asset_id}.part"
        identity = self.staging / f"{asset.asset_id}.json"
        final = self.root / asset.path

        mismatch = None
        for round_number in (1, 2):
            try:
                self._transfer(asset, part, identity)
                mismatch = _find_mismatch(part, asset)
                if mismatch is None:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(part, final)
                    identity.unlink(missing_ok=True)
                    logger.info("verified %s (%d bytes)", final, asset.size)
                    return _manifest_entry(asset, final)
            except OSError as error:
                # Network errors were handled in _transfer, so this is the local disk.
                raise SourceError(
                    f"could not write asset {asset.path!r} of {self.label} under {self.root} ({error}); "
                    "free some disk space or choose another --dest"
                ) from error

            part.unlink(missing_ok=True)
            identity.unlink(missing_ok=True)
            self.counter.set(asset.asset_id, 0)
            if round_number == 1:
                logger.warning(
                    "%s: downloaded %s has %s %s, expected %s; deleted it and downloading it again",
                    self.label, asset.path, mismatch.digest, mismatch.actual, mismatch.expected,
                )

        raise SourceError(
            f"asset {asset.path!r} of {self.label} failed verification twice: expected {mismatch.digest} "
            f"{mismatch.expected}, got {mismatch.actual}; the download was deleted. The archive's copy or its "
            "metadata may be damaged, so report it to the Dandiset's maintainers"
        )

    def _transfer(self, asset: AssetInfo, part: Path, identity: Path) -> None:
        """Bring ``part`` to the asset's full size, resuming from bytes left by an earlier attempt or run."""
        expected_identity = {"asset_id": asset.asset_id, "dandi_etag": asset.etag, "size": asset.size}
        if part.exists() and _read_identity(identity) == expected_identity and part.stat().st_size <= asset.size:
            logger.info("%s: resuming %s at byte %d of %d", self.label, asset.path, part.stat().st_size, asset.size)
        else:
            part.unlink(missing_ok=True)
            identity.write_text(json.dumps(expected_identity), encoding="utf-8")
            part.touch()
        self.counter.set(asset.asset_id, part.stat().st_size)

        failures = 0
        while True:
            offset = part.stat().st_size
            if offset >= asset.size:
                return

            retry_after_s = None
            try:
                self._receive(asset, part, offset)
                if part.stat().st_size >= asset.size:
                    return
                reason = f"the response ended at byte {part.stat().st_size} of {asset.size}"
            except requests.HTTPError as error:
                status = error.response.status_code if error.response is not None else None
                if status not in RETRY_STATUSES:
                    raise SourceError(
                        f"download of asset {asset.path!r} of {self.label} failed with HTTP status {status}; "
                        "check that the asset is public and try again"
                    ) from error
                reason = f"HTTP status {status}"
                retry_after_s = get_retry_after(error.response)
            except requests.RequestException as error:
                reason = f"connection failed: {error}"

            failures = 1 if part.stat().st_size > offset else failures + 1
            if failures >= self.retry.attempts:
                raise SourceError(
                    f"download of asset {asset.path!r} of {self.label} failed {failures} times in a row, "
                    f"last with {reason}; run the command again to resume"
                )
            delay_s = self.retry.delay_s(failures, retry_after_s)
            logger.warning(
                "%s: download of %s failed (%s); retry %d of %d in %.2f s",
                self.label, asset.path, reason, failures, self.retry.attempts - 1, delay_s,
            )
            if self.stop.wait(delay_s):
                raise _Cancelled()

    def _receive(self, asset: AssetInfo, part: Path, offset: int) -> None:
        """Append the blob's bytes from ``offset`` to ``part`` with one request through the client's session."""
        remote = asset.remote
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with remote.client.session.get(
            remote.base_download_url, headers=headers, stream=True, timeout=DOWNLOAD_TIMEOUT_S
        ) as response:
            response.raise_for_status()
            mode = "ab"
            if offset and not _starts_at(response, offset):
                logger.info("%s: the server ignored the range request for %s; downloading it from the start", self.label, asset.path)
                mode = "wb"
                self.counter.set(asset.asset_id, 0)

            with part.open(mode) as handle:
                for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
                    if self.stop.is_set():
                        raise _Cancelled()
                    handle.write(chunk)
                    self.counter.add(asset.asset_id, len(chunk))


def _starts_at(response: requests.Response, offset: int) -> bool:
    """Return whether a response to a range request carries the bytes from ``offset`` on."""
    if response.status_code != 206:
        return False
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return match is not None and int(match.group(1)) == offset


def _read_identity(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _verified_entry(root: Path, asset: AssetInfo, previous: dict | None, label: str) -> dict | None:
    """Return the manifest entry of an existing file that matches the asset, or None when it must be downloaded.

    A file whose size and mtime equal those recorded in the manifest, for the same
    dandi-etag, is trusted without reading it. Any other existing file is checked
    by its digests, and deleted when it does not match.
    """
    final = root / asset.path
    if not final.is_file():
        return None

    stat = final.stat()
    if stat.st_size != asset.size:
        logger.warning("%s: %s has %d bytes, expected %d; deleted it and downloading it again", label, final, stat.st_size, asset.size)
        final.unlink()
        return None

    if (
        previous is not None
        and previous.get("dandi_etag") == asset.etag
        and previous.get("size") == stat.st_size
        and previous.get("mtime_ns") == stat.st_mtime_ns
    ):
        # NOTE: an edit that keeps both the size and the mtime goes unnoticed here.
        return {**previous, "asset_id": asset.asset_id, "sha256": asset.sha256}

    mismatch = _find_mismatch(final, asset)
    if mismatch is None:
        return _manifest_entry(asset, final)
    logger.warning(
        "%s: %s has %s %s, expected %s; deleted it and downloading it again",
        label, final, mismatch.digest, mismatch.actual, mismatch.expected,
    )
    final.unlink()
    return None


@contextmanager
def _fetch_lock(root: Path) -> Iterator[None]:
    """Hold a lock file in the dandiset folder so that two fetches never write the same files."""
    lock = fasteners.InterProcessLock(str(root / LOCK_NAME))
    if not lock.acquire(blocking=False):
        raise SourceError(f"another fetch is writing to {root}; wait for it to finish, or choose another --dest")
    try:
        yield
    finally:
        lock.release()


def fetch(
    ref: DandiRef | str,
    globs: Sequence[str] = (),
    dest: Path | str = DEFAULT_DEST,
    *,
    api_url: str | None = None,
    jobs: int = 1,
    progress: Progress | None = None,
    retry: RetryPolicy | None = None,
) -> FetchResult:
    """Download the assets of a Dandiset version that match any of ``globs`` into ``dest/<dandiset id>/``.

    Every asset path is checked before anything is written. Files already present
    and verified are skipped. Each new file is downloaded to a staging folder,
    resumed after a dropped connection, verified against the metadata digests, and
    only then moved to its final path. The manifest is rewritten at the end, also
    when a download fails, so that the files verified so far are skipped next time.

    Parameters
    ----------
    ref
        ``DANDI:<id>[/<version>]``, or a parsed :class:`DandiRef`.
    globs
        Asset path globs; an empty sequence selects every asset.
    dest
        Folder that receives one subfolder per Dandiset.
    api_url
        REST API of the DANDI instance; see :func:`resolve_api_url`.
    jobs
        Number of files downloaded in parallel.
    progress
        Receives the bytes downloaded so far; nothing is drawn by default.
    retry
        Retries of failed blob requests; :meth:`RetryPolicy.from_env` by default.

    Raises
    ------
    SourceError
        For a failure the user can act on: an unknown Dandiset or version, no matching
        asset, an unsafe asset path, an unreachable instance, a failed download or a
        digest mismatch.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    ref = _as_ref(ref)
    api_url = resolve_api_url(api_url)
    retry = retry or RetryPolicy.from_env()
    progress = progress or SilentProgress()

    with _open_client(api_url) as client:
        version, assets = _list(client, ref, globs, api_url)
        label = f"DANDI:{ref.dandiset_id}/{version}"
        root = Path(dest) / ref.dandiset_id
        _check_local_paths(root, assets, label)
        for asset in assets:
            _require_digest(asset, label)

        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SourceError(f"could not create the download folder {root} ({error}); choose another --dest") from error
        with _fetch_lock(root):
            return _fetch_into(root, ref, version, assets, api_url, jobs, progress, retry)


def _fetch_into(
    root: Path,
    ref: DandiRef,
    version: str,
    assets: list[AssetInfo],
    api_url: str,
    jobs: int,
    progress: Progress,
    retry: RetryPolicy,
) -> FetchResult:
    label = f"DANDI:{ref.dandiset_id}/{version}"
    manifest_path = root / MANIFEST_NAME
    previous = _read_manifest(manifest_path)
    previous_entries = {entry.get("path"): entry for entry in previous["assets"]} if previous else {}

    verified: dict[str, dict] = {}
    pending = []
    for asset in assets:
        entry = _verified_entry(root, asset, previous_entries.get(asset.path), label)
        if entry is None:
            pending.append(asset)
        else:
            verified[asset.path] = entry
    skipped = sorted(verified)
    logger.info("%s: %d files to download, %d already verified", label, len(pending), len(skipped))

    try:
        if pending:
            _download_all(root, label, pending, jobs, progress, retry, verified)
    finally:
        _write_manifest(manifest_path, _merged_manifest(previous, ref, version, api_url, verified))
        _remove_empty_staging(root / STAGING_DIR_NAME)

    return FetchResult(
        dandiset_id=ref.dandiset_id,
        version=version,
        paths=[root / asset.path for asset in assets],
        manifest_path=manifest_path,
        downloaded=[asset.path for asset in pending],
        skipped=skipped,
    )


def _download_all(
    root: Path,
    label: str,
    pending: list[AssetInfo],
    jobs: int,
    progress: Progress,
    retry: RetryPolicy,
    verified: dict[str, dict],
) -> None:
    """Download ``pending`` with ``jobs`` threads, adding each verified file's entry to ``verified``."""
    staging = root / STAGING_DIR_NAME
    staging.mkdir(exist_ok=True)
    total = sum(asset.size for asset in pending)

    with progress.stage(f"downloading {len(pending)} files of {label}", total) as advance:
        download = _Download(label, root, staging, retry, _ByteCounter(advance), threading.Event())
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="neurpir-fetch")
        futures = {pool.submit(download.run, asset): asset for asset in pending}
        interrupted = True
        try:
            _, not_done = wait(futures, return_when=FIRST_EXCEPTION)
            interrupted = bool(not_done)
        finally:
            # After a failure or an interrupt, running downloads stop at their next chunk and queued ones never start.
            if interrupted:
                download.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            errors = _collect_results(futures, verified)

    for error in errors[1:]:
        logger.error("%s", error)
    if errors:
        raise errors[0]


def _collect_results(futures: dict, verified: dict[str, dict]) -> list[BaseException]:
    """Add the entries of finished downloads to ``verified`` and return the errors of failed ones."""
    errors = []
    for future, asset in futures.items():
        if not future.done() or future.cancelled():
            continue
        error = future.exception()
        if error is None:
            verified[asset.path] = future.result()
        elif not isinstance(error, _Cancelled):
            errors.append(error)
    return errors


def _merged_manifest(
    previous: dict | None, ref: DandiRef, version: str, api_url: str, verified: dict[str, dict]
) -> dict:
    """Return the new manifest: this fetch's verified files, plus earlier entries of the same version."""
    entries = dict(verified)
    same_source = (
        previous is not None
        and previous.get("dandiset_id") == ref.dandiset_id
        and previous.get("version") == version
        and previous.get("api_url") == api_url
    )
    if same_source:
        for entry in previous["assets"]:
            entries.setdefault(entry.get("path"), entry)
    elif previous is not None:
        dropped = [entry.get("path") for entry in previous["assets"] if entry.get("path") not in entries]
        if dropped:
            logger.info(
                "the manifest now records DANDI:%s/%s from %s, so it drops %d files of version %s from %s "
                "that this fetch did not select; they stay on disk",
                ref.dandiset_id, version, api_url, len(dropped), previous.get("version"), previous.get("api_url"),
            )
    return {
        "format": MANIFEST_FORMAT,
        "dandiset_id": ref.dandiset_id,
        "version": version,
        "api_url": api_url,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "assets": [entries[path] for path in sorted(entries)],
    }


def _remove_empty_staging(staging: Path) -> None:
    try:
        staging.rmdir()
    except OSError:
        # The folder is missing, or it contains partial files that a later fetch resumes.
        pass


# Streaming


def stream_url(asset: AssetInfo) -> str:
    """Return the URL of the asset's bytes for streaming: the redirect target of its download URL, without query."""
    if asset.remote is None:
        raise SourceError(f"asset {asset.path!r} carries no DANDI client; get it from list_assets() to stream it")
    api_url = asset.remote.client.api_url
    with _api_errors(api_url, f"the content URL of asset {asset.path!r}"):
        return asset.remote.get_content_url(follow_redirects=1, strip_query=True)


def open_stream(url: str, *, block_size: int = STREAM_BLOCK_SIZE) -> IO[bytes]:
    """Open a read-only file object over HTTP range requests, for ``h5py.File`` and ``NWBHDF5IO(file=...)``.

    Blocks of ``block_size`` bytes are fetched on demand and kept in memory while
    the file is open. Close the returned object after the HDF5 file.
    """
    import aiohttp
    import fsspec

    filesystem = fsspec.filesystem("http")
    try:
        return filesystem.open(url, mode="rb", block_size=block_size, cache_type="blockcache")
    except FileNotFoundError as error:
        raise SourceError(f"no file found at {url} to stream; check the URL or fetch the asset instead") from error
    except (aiohttp.ClientError, OSError) as error:
        raise SourceError(f"could not open {url} for streaming ({error}); check the network connection") from error
