"""Reading the safetensors header and the ``torchslim`` manifest without loading tensors."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from torchslim._version import __version__
from torchslim.errors import ArtifactError

FORMAT = "torchslim.slim"
FORMAT_VERSION = 2  # 2: tensors shared by several names are stored once (alias entries)
MANIFEST_KEY = "torchslim"
# The manifest text ends with this field: the SHA-256 of the text written before it (absent in older files).
# It lives inside the one metadata entry because safetensors writes several entries in random order,
# and identical models must give identical files.
MANIFEST_DIGEST_FIELD = "manifest_sha256"
_DIGEST_SUFFIX = re.compile(rf', "{MANIFEST_DIGEST_FIELD}": "([0-9a-f]{{64}})"\}}\Z')
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as stored: JSON with ``manifest_sha256`` (of the JSON before it) as the last field."""
    text = json.dumps(manifest)
    return f'{text[:-1]}, "{MANIFEST_DIGEST_FIELD}": "{_sha256_text(text)}"}}'
METADATA_KEY = "__metadata__"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def corrupted(where: str, detail: str, data: bytes | None = None) -> ArtifactError:
    """The standard error for a file that safetensors cannot parse."""
    hint = ""
    if data is not None and (
        data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04"
    ):
        hint = (
            "; it looks like a pickle or torch.save checkpoint, which torchslim never unpickles "
            "(unsafe): load it yourself and write it with torchslim.save"
        )
    return ArtifactError(f"{where}: not a readable .slim file (truncated or corrupted: {detail}){hint}")


def read_file(path: str | os.PathLike) -> bytes:
    """Return the whole file.

    Raises:
        ArtifactError: if the file does not exist or cannot be read.
    """
    where = str(path)
    file = Path(path)
    if not file.exists():
        raise ArtifactError(f"{where}: no such file (expected a .slim file written by torchslim.save)")
    if not file.is_file():
        raise ArtifactError(
            f"{where}: is not a regular file (expected a .slim file written by torchslim.save)"
        )
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{where}: cannot be read ({exc.strerror or exc})") from exc


def parse_header(prefix: bytes, total_size: int, where: str) -> dict[str, Any]:
    """Parse a safetensors header from the first bytes of a file.

    Args:
        prefix: the file's first bytes (at least ``8 + header length`` of them for a good file).
        total_size: the file's size in bytes.
        where: the file name, for messages.

    Returns:
        The header: stored key -> ``{"dtype", "shape", "data_offsets"}`` plus ``__metadata__``.

    Raises:
        ArtifactError: if the header is cut short, too long, not JSON, or malformed.
    """
    if total_size < 8 or len(prefix) < 8:
        raise corrupted(where, f"{total_size} bytes, shorter than the 8-byte header length", prefix)
    length = int.from_bytes(prefix[:8], "little")
    if length > _MAX_HEADER_BYTES or 8 + length > total_size:
        raise corrupted(where, f"header length {length} does not fit in a file of {total_size} bytes", prefix)
    try:
        header = json.loads(bytes(prefix[8 : 8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise corrupted(where, f"header is not JSON ({exc})", prefix) from exc
    if not isinstance(header, dict):
        raise corrupted(where, "header is not a JSON object", prefix)
    data_size = total_size - 8 - length
    for key, entry in header.items():
        if key == METADATA_KEY:
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise corrupted(
                where, f"stored tensor {key!r} has data offsets {offsets!r} outside the data", prefix
            )
    return header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read only the header of a file (8 + header-length bytes), not its tensors.

    Raises:
        ArtifactError: missing, unreadable or corrupted file.
    """
    where = str(path)
    file = Path(path)
    if not file.exists():
        raise ArtifactError(f"{where}: no such file (expected a .slim file written by torchslim.save)")
    try:
        with open(file, "rb") as handle:
            total = os.fstat(handle.fileno()).st_size
            first = handle.read(8)
            length = int.from_bytes(first, "little") if len(first) == 8 else 0
            rest = handle.read(length) if 0 < length <= min(_MAX_HEADER_BYTES, total) else b""
    except OSError as exc:
        raise ArtifactError(f"{where}: cannot be read ({exc.strerror or exc})") from exc
    return parse_header(first + rest, total, where)


def manifest_from_header(header: dict[str, Any], where: str) -> dict[str, Any]:
    """Extract and validate the ``torchslim`` manifest from a parsed header.

    Raises:
        ArtifactError: no manifest, manifest not JSON, another format, a newer format version, or a
            malformed field (the message names the field).
    """
    metadata = header.get(METADATA_KEY)
    text = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise ArtifactError(
            f"{where}: safetensors file without a {MANIFEST_KEY!r} manifest in its metadata: "
            "expected a .slim file written by torchslim.save"
        )
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"{where}: manifest is not valid JSON ({exc})") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        validate_manifest(manifest, where)  # "upgrade torchslim": a newer format may check itself differently
    suffix = _DIGEST_SUFFIX.search(text)
    if suffix is not None and _sha256_text(text[: suffix.start()] + "}") != suffix.group(1):
        raise ArtifactError(
            f"{where}: the manifest does not match its sha256 checksum ({MANIFEST_DIGEST_FIELD!r}): "
            "the file was corrupted or changed after it was written; use the original file"
        )
    if isinstance(manifest, dict) and MANIFEST_DIGEST_FIELD in manifest:
        if suffix is None:  # present but not where save writes it: edited by hand or damaged
            raise ArtifactError(
                f"{where}: manifest {MANIFEST_DIGEST_FIELD} = {manifest[MANIFEST_DIGEST_FIELD]!r} is invalid: "
                "expected 64 lowercase hex digits as the manifest's last field"
            )
        del manifest[MANIFEST_DIGEST_FIELD]
    validate_manifest(manifest, where)
    return manifest


def validate_manifest(manifest: Any, where: str) -> None:
    """Check the manifest layout (see ``docs/design.md``, "Artifact").

    Raises:
        ArtifactError: naming the first field that is missing or malformed.
    """
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: manifest is a {type(manifest).__name__}, expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{where}: manifest format = {manifest.get('format')!r} is invalid: expected {FORMAT!r}"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(
            f"{where}: manifest format_version = {version!r} is invalid: expected an integer in "
            f"[1, {FORMAT_VERSION}]"
        )
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: format_version {version} was written by a newer torchslim "
            f"({manifest.get('torchslim_version')!r}); torchslim {__version__} reads format_version <= "
            f"{FORMAT_VERSION}: upgrade torchslim"
        )
    factory = manifest.get("factory")
    if not (
        isinstance(factory, dict)
        and isinstance(factory.get("name"), str)
        and isinstance(factory.get("kwargs"), dict)
    ):
        raise ArtifactError(
            f"{where}: manifest factory = {factory!r} is invalid: expected {{'name': str, 'kwargs': dict}}"
        )
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise ArtifactError(f"{where}: manifest modules = {modules!r} is invalid: expected an object")
    for name, entry in modules.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("codec"), str)
            and isinstance(entry.get("spec"), dict)
        ):
            raise ArtifactError(
                f"{where}: manifest modules[{name!r}] = {entry!r} is invalid: expected "
                "{'codec': str, 'spec': dict}"
            )
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise ArtifactError(f"{where}: manifest tensors = {tensors!r} is invalid: expected an object")
    for name, entry in tensors.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("encoding"), str)
            and isinstance(entry.get("dtype"), str)
        )
        shape = entry.get("shape") if ok else None
        stored = entry.get("stored") if ok else None
        ok = (
            ok
            and isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        )
        ok = ok and isinstance(stored, list) and all(isinstance(k, str) for k in stored)
        digest = entry.get("sha256") if ok else None
        ok = ok and (digest is None or (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest) is not None))
        if not ok:
            raise ArtifactError(
                f"{where}: manifest tensors[{name!r}] = {entry!r} is invalid: expected "
                "{'encoding': str, 'dtype': str, 'shape': [non-negative ints], 'stored': [str], "
                "optional 'sha256': 64 lowercase hex digits}"
            )
