"""Open NWB 2.x files for reading, with a clear error for every file pynwb cannot read.

The checks run on the raw HDF5 file before pynwb reads it. A missing file, a
truncated download, an NWB 1.x file or an extension without its specification then
fails with one sentence that names the file and gives the fix, not with a traceback
from inside h5py or pynwb. The same pass finds the file-level data problems: a
session start time without a timezone, an old schema and extensions whose
specification is not cached.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pynwb
from pynwb import NWBFile, NWBHDF5IO

from neurpir_nwb.errors import SourceError
from neurpir_nwb.io.problems import Problem, ProblemHandler, setting

logger = logging.getLogger(__name__)

#: Files of schema versions below this one were written by pynwb 1.2 or earlier, or by MatNWB of that time.
OLDEST_CURRENT_SCHEMA = (2, 2, 0)

#: Namespaces that every NWB 2 reader provides without a cached specification.
BUILT_IN_NAMESPACES = frozenset({"core", "hdmf-common", "hdmf-experimental"})


@contextmanager
def open_nwb(path: str | Path, *, handler: ProblemHandler | None = None) -> Iterator[tuple[NWBHDF5IO, NWBFile]]:
    """Open an NWB 2.x file read-only and yield ``(io, nwbfile)``.

    The file is opened in mode ``"r"`` and closed when the ``with`` block ends.

    Parameters
    ----------
    path
        Local path of the NWB file.
    handler
        Receives the file-level data problems (see :func:`file_problems`); by default
        they are logged as warnings under the default policy.

    Yields
    ------
    tuple of (NWBHDF5IO, NWBFile)
        The open IO object and the file it read.

    Raises
    ------
    SourceError
        When the file is missing, is not an HDF5 file, is truncated, is not an NWB
        2.x file, uses an extension whose specification is neither cached nor loaded,
        or pynwb fails to read it. The message names the file.
    DataError
        When the handler's policy raises for a file-level data problem.
    """
    handler = handler if handler is not None else ProblemHandler(log=logger)
    url = remote_url(path)
    if url is not None:
        with _open_remote_nwb(url, handler) as opened:
            yield opened
        return

    path = Path(path)
    with open_hdf5(path) as h5file:
        check_nwb_root(path, h5file)
        found = file_problems(path, h5file)
    for problem in found:
        handler.report(problem)

    try:
        io = NWBHDF5IO(str(path), mode="r")
    except Exception as error:  # pynwb and hdmf raise many types while building the type map.
        raise SourceError(f"{path} could not be opened by pynwb: {_one_line(error)}") from error

    try:
        yield io, read_nwbfile(path, io)
    finally:
        io.close()


def remote_url(path: str | Path) -> str | None:
    """Return the URL when ``path`` names a file on an HTTP(S) server, else None.

    ``Path`` collapses the double slash after the scheme, so ``Path("https://host/x")``
    is accepted too and gives back ``"https://host/x"``.
    """
    text = str(path)
    match = re.match(r"^(https?):/+(.*)$", text)
    if match is None:
        return None
    return f"{match.group(1)}://{match.group(2)}"


@contextmanager
def _open_remote_nwb(url: str, handler: ProblemHandler) -> Iterator[tuple[NWBHDF5IO, NWBFile]]:
    """Open an NWB file over HTTP range requests, so that only the bytes the reader touches are fetched."""
    from neurpir_nwb.dandi import open_stream  # imported here because the dandi client loads slowly

    stream = open_stream(url)
    try:
        try:
            h5file = h5py.File(stream, "r")
        except OSError as error:
            raise SourceError(f"{url} could not be opened as an HDF5 file over HTTP: {_one_line(error)}") from error

        try:
            check_nwb_root(url, h5file)
            for problem in file_problems(url, h5file):
                handler.report(problem)
            try:
                io = NWBHDF5IO(file=h5file, mode="r", load_namespaces=True)
            except Exception as error:  # pynwb and hdmf raise many types while building the type map.
                raise SourceError(f"{url} could not be opened by pynwb: {_one_line(error)}") from error
            try:
                yield io, read_nwbfile(url, io)
            finally:
                io.close()
        finally:
            h5file.close()
    finally:
        stream.close()


def read_nwbfile(label: str | Path, io: NWBHDF5IO) -> NWBFile:
    """Read the NWBFile of an open IO object, turning any failure of pynwb into one SourceError.

    pynwb's warnings about the content of the file, such as an inconsistent
    OpticalSeries, are logged once each at INFO level.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nwbfile = io.read()
    except Exception as error:  # Any failure of the reader means the file is unreadable here.
        raise SourceError(
            f"{label} is not a readable NWB 2.x file: pynwb failed to read it ({_one_line(error)})"
        ) from error

    for message in dict.fromkeys(str(warning.message) for warning in caught):
        logger.info("%s: pynwb reported while reading: %s", Path(str(label)).name, message)
    return nwbfile


def nwb_version(path: str | Path) -> str:
    """Read the NWB schema version that a file declares.

    NWB 2.x files store it as the root attribute ``nwb_version``; NWB 1.x files store
    it as a root dataset of the same name, and that value is returned as stored (for
    example ``"NWB-1.0.5"``).

    Raises
    ------
    SourceError
        When the file is missing, is not an HDF5 file, is truncated, or declares no
        NWB version at all.
    """
    path = Path(path)
    with open_hdf5(path) as h5file:
        return _declared_version(path, h5file)


def check_nwb_file(path: str | Path) -> None:
    """Raise SourceError unless the file is an HDF5 file that pynwb can read as NWB 2.x.

    This reads the root of the file and the attributes of its objects with h5py, so
    it is cheap and runs before pynwb builds anything. See :func:`check_nwb_root`.
    """
    path = Path(path)
    with open_hdf5(path) as h5file:
        check_nwb_root(path, h5file)


def check_nwb_root(label: str | Path, h5file: h5py.File) -> str:
    """Raise SourceError unless an open HDF5 file declares NWB 2.x in a form pynwb reads; return the version.

    Rejected are NWB 1.x files and pre-release layouts (whose message asks the user to
    convert them first), root attributes stored as arrays (early MatNWB), and extensions whose
    specification is neither cached in the file nor loaded in pynwb.
    """
    version = _declared_version(label, h5file)

    if "nwb_version" not in h5file.attrs or not version.startswith("2."):
        raise SourceError(
            f"{label} has nwb_version {version!r}, so it is not a readable NWB 2.x file; "
            "convert it to NWB 2 first"
        )

    if isinstance(h5file.attrs["nwb_version"], np.ndarray):
        raise SourceError(
            f"{label} is not a readable NWB 2.x file: its root attributes are stored as arrays "
            f"(nwb_version {version}, as early MatNWB versions wrote them), which pynwb cannot read; "
            "export it again with a current MatNWB or pynwb"
        )

    missing = {namespace: objects for namespace, objects in uncached_namespaces(h5file).items() if namespace not in _loaded_namespaces()}
    if missing:
        namespace, objects = next(iter(missing.items()))
        raise SourceError(
            f"{label} is not readable here: it uses the extension namespace {namespace!r} (at {', '.join(objects[:3])}) "
            "but does not cache its specification, and pynwb has not loaded it; write the file again with the "
            "specification cached (pynwb's NWBHDF5IO.write caches it by default), or ask its authors for such a file"
        )
    return version


def file_problems(label: str | Path, h5file: h5py.File) -> list[Problem]:
    """Find the file-level data problems of an NWB 2.x file.

    These are a ``session_start_time`` without a timezone (``naive_session_start``),
    a schema older than 2.2.0 or no cached specifications (``old_schema``), and
    extension namespaces that the file uses without caching them but that pynwb has
    loaded (``uncached_extension``).
    """
    problems = []
    version = _declared_version(label, h5file)

    start_text = _read_text(h5file.get("session_start_time"))
    start = _parse_datetime(start_text)
    if start is not None and start.tzinfo is None:
        problems.append(
            Problem(
                kind="naive_session_start",
                description=f"{label}: session_start_time {start_text!r} has no timezone",
                repair="pynwb takes the local timezone of this machine; spike and sample times are relative to it, so they do not change",
                fix=f"store the time with its UTC offset in the file, or set {setting('naive_session_start', 'ignore')} in the recipe",
                table="session_start_time",
            )
        )

    cached = "specifications" in h5file and len(h5file["specifications"]) > 0
    if _version_tuple(version) < OLDEST_CURRENT_SCHEMA or not cached:
        reason = f"NWB schema {version}" + ("" if cached else " without cached specifications")
        problems.append(
            Problem(
                kind="old_schema",
                description=f"{label} was written with {reason}, as pynwb 1.2 and earlier wrote files",
                repair="pynwb maps it to its current schema; columns that the schema renamed since may read as missing",
                fix=(
                    "convert it with a current pynwb (read it and write it to a new file) if labels or positions are missing, "
                    f"or set {setting('old_schema', 'ignore')} in the recipe"
                ),
            )
        )

    for namespace, objects in uncached_namespaces(h5file).items():
        if namespace in _loaded_namespaces():
            problems.append(
                Problem(
                    kind="uncached_extension",
                    description=(
                        f"{label} uses the extension namespace {namespace!r} (at {', '.join(objects[:3])}) "
                        "without caching its specification"
                    ),
                    repair="the version of the extension that pynwb has loaded is used",
                    fix=f"write the file again with its specification cached, or set {setting('uncached_extension', 'ignore')} in the recipe",
                    table=objects[0],
                )
            )
    return problems


def uncached_namespaces(h5file: h5py.File) -> dict[str, list[str]]:
    """Return the namespaces that typed objects of the file use but that the file does not cache, with their paths.

    Only object attributes are read, never dataset values.
    """
    cached = set(h5file["specifications"].keys()) if isinstance(h5file.get("specifications"), h5py.Group) else set()
    used: dict[str, list[str]] = {}

    def visit(name: str, obj: h5py.Group | h5py.Dataset) -> None:
        namespace = obj.attrs.get("namespace")
        if namespace is None:
            return
        namespace = _decode_version(namespace)
        if namespace and namespace not in cached and namespace not in BUILT_IN_NAMESPACES:
            used.setdefault(namespace, []).append(name)

    h5file.visititems(visit)
    return used


def _loaded_namespaces() -> set[str]:
    """Return the namespaces pynwb's type map has loaded, such as those of imported extension packages."""
    return set(pynwb.get_type_map().namespace_catalog.namespaces)


def _read_text(dataset: object) -> str | None:
    """Return a scalar or one-element string dataset as str, or None when it is missing or not text."""
    if not isinstance(dataset, h5py.Dataset):
        return None
    value = dataset[()]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.ravel()[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _parse_datetime(text: str | None) -> datetime | None:
    """Parse an ISO 8601 date and time, or return None when it is not one."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    """Return the leading numbers of a version: ``"2.6.0-alpha"`` gives (2, 6, 0), ``"2.0b"`` gives (2, 0)."""
    numbers = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


@contextmanager
def open_hdf5(path: Path) -> Iterator[h5py.File]:
    """Open a file with h5py read-only, turning every failure into one SourceError."""
    if not path.exists():
        raise SourceError(f"NWB file {path} not found")
    if path.is_dir():
        raise SourceError(f"{path} is a folder, not an NWB file; give the path of a .nwb file")

    try:
        h5file = h5py.File(path, "r")
    except OSError as error:
        text = str(error)
        if "truncated file" in text:
            raise SourceError(
                f"{path} is truncated{_size_note(text)}, for example by an incomplete download; "
                "download it again"
            ) from error
        if "file signature not found" in text:
            raise SourceError(f"{path} is not an NWB file: it is not an HDF5 file") from error
        raise SourceError(f"{path} could not be opened as an HDF5 file: {_one_line(error)}") from error

    try:
        yield h5file
    finally:
        h5file.close()


def _declared_version(path: str | Path, h5file: h5py.File) -> str:
    """Return the NWB version from the root attribute, else from the NWB 1.x root dataset."""
    if "nwb_version" in h5file.attrs:
        return _decode_version(h5file.attrs["nwb_version"])

    stored = h5file.get("nwb_version")
    if isinstance(stored, h5py.Dataset):
        return _decode_version(stored[()])

    raise SourceError(f"{path} is not an NWB file: it has no nwb_version attribute at its root")


def _decode_version(value: object) -> str:
    """Turn a stored version (str, bytes, or a 1-element array of either) into str."""
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def _size_note(h5py_message: str) -> str:
    """Return " (N of M bytes)" from h5py's truncated-file message, or "" when it has no sizes."""
    match = re.search(r"\beof = (\d+).*stored_eof = (\d+)", h5py_message)
    if match is None:
        return ""
    return f" ({match.group(1)} of {match.group(2)} bytes)"


def _one_line(error: BaseException) -> str:
    """Return the first line of an exception's text, prefixed by its type name."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first}"
