"""Open NWB 2.x files for reading, with a clear error for every file pynwb cannot read.

The checks run on the raw HDF5 file before pynwb reads it. A missing file, a
truncated download or an NWB 1.x file then fails with one sentence that names the
file and gives the fix, not with a traceback from inside h5py or pynwb.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from pynwb import NWBFile, NWBHDF5IO

from neurpir_nwb.errors import SourceError

logger = logging.getLogger(__name__)


@contextmanager
def open_nwb(path: str | Path) -> Iterator[tuple[NWBHDF5IO, NWBFile]]:
    """Open an NWB 2.x file read-only and yield ``(io, nwbfile)``.

    The file is opened in mode ``"r"`` and closed when the ``with`` block ends.

    Parameters
    ----------
    path
        Local path of the NWB file.

    Yields
    ------
    tuple of (NWBHDF5IO, NWBFile)
        The open IO object and the file it read.

    Raises
    ------
    SourceError
        When the file is missing, is not an HDF5 file, is truncated, is not an NWB
        2.x file, or pynwb fails to read it. The message names the file.
    """
    path = Path(path)
    check_nwb_file(path)

    try:
        io = NWBHDF5IO(str(path), mode="r")
    except Exception as error:  # pynwb and hdmf raise many types while building the type map.
        raise SourceError(f"{path} could not be opened by pynwb: {_one_line(error)}") from error

    try:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                nwbfile = io.read()
        except Exception as error:  # Any failure of the reader means the file is unreadable here.
            raise SourceError(
                f"{path} is not a readable NWB 2.x file: pynwb failed to read it ({_one_line(error)})"
            ) from error

        # pynwb warns about the content of the file, such as an inconsistent OpticalSeries, on every read.
        for message in dict.fromkeys(str(warning.message) for warning in caught):
            logger.info("%s: pynwb reported while reading: %s", path.name, message)
        yield io, nwbfile
    finally:
        io.close()


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
    with _open_hdf5(path) as h5file:
        return _declared_version(path, h5file)


def check_nwb_file(path: str | Path) -> None:
    """Raise SourceError unless the file is an HDF5 file that declares NWB version 2.x.

    This reads only the root of the file with h5py, so it is cheap and runs before
    pynwb builds anything.
    """
    path = Path(path)
    with _open_hdf5(path) as h5file:
        version = _declared_version(path, h5file)

        if "nwb_version" not in h5file.attrs or not version.startswith("2."):
            raise SourceError(
                f"{path} has nwb_version {version!r}, so it is not a readable NWB 2.x file; "
                "convert it to NWB 2 first"
            )

        if isinstance(h5file.attrs["nwb_version"], np.ndarray):
            raise SourceError(
                f"{path} is not a readable NWB 2.x file: its root attributes are stored as arrays "
                f"(nwb_version {version}, as early MatNWB versions wrote them), which pynwb cannot read; "
                "export it again with a current MatNWB or pynwb"
            )


@contextmanager
def _open_hdf5(path: Path) -> Iterator[h5py.File]:
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


def _declared_version(path: Path, h5file: h5py.File) -> str:
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
