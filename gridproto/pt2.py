"""Check that an uploaded file is a torch.export program that loads without pickle.

``torch.export.load`` falls back to full pickle (``weights_only=False``) for
legacy weight files, pickled weights and constants, custom objects and sample
inputs (torch 2.13, ``torch/export/pt2_archive/_package.py``). This module
accepts only archives where none of those paths can run: every entry is on an
allowlist and every weight and constant is stored as raw bytes. The agent then
loads a copy whose sample-input entry is emptied, since torch deserializes that
entry with a pickle fallback.

Only the standard library is used, so the gateway can check uploads without
importing torch.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any

NOT_A_PROGRAM = "the file is not an exported program; export it with torch.export.export and save it with torch.export.save"

_MODEL_NAME = r"[A-Za-z0-9_]+"
_ALLOWED = [
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"\.data/version",
        r"\.data/serialization_id",
        rf"models/{_MODEL_NAME}\.json",
        rf"data/weights/{_MODEL_NAME}_weights_config\.json",
        r"data/weights/weight_[0-9]+",
        rf"data/constants/{_MODEL_NAME}_constants_config\.json",
        r"data/constants/tensor_[0-9]+",
        rf"data/sample_inputs/{_MODEL_NAME}\.pt",
    )
]
SAMPLE_INPUTS_PREFIX = "data/sample_inputs/"
MAX_JSON_BYTES = 64 * 1024 * 1024


class ArchiveError(ValueError):
    """An upload that is not a pickle-free exported program."""


@dataclass(frozen=True)
class ArchiveInfo:
    root: str
    input_names: list[str]
    unpacked_bytes: int


def _relative(name: str) -> tuple[str, str]:
    root, _, rest = name.partition("/")
    return root, rest


# Exceptions zipfile raises for an entry it cannot read: a bad CRC or local
# header, a corrupt deflate stream, a truncated file, encryption, an unknown method.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError)


def _read_entry(archive: zipfile.ZipFile, name: str | zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(name)
    except _READ_ERRORS as exc:
        filename = name.filename if isinstance(name, zipfile.ZipInfo) else name
        raise ArchiveError(f"{filename} cannot be read ({exc}); {NOT_A_PROGRAM}") from None


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_JSON_BYTES:
        raise ArchiveError(f"{info.filename} is {info.file_size} bytes, over the {MAX_JSON_BYTES}-byte limit for metadata")
    try:
        return json.loads(_read_entry(archive, info))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ArchiveError(f"{info.filename} is not valid JSON; {NOT_A_PROGRAM}") from None


def _check_payload_config(archive: zipfile.ZipFile, info: zipfile.ZipInfo, kind: str) -> None:
    config = _read_json(archive, info)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ArchiveError(f"{info.filename} has no 'config' object; {NOT_A_PROGRAM}")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise ArchiveError(f"{kind} {fqn!r} has malformed metadata")
        if meta.get("use_pickle") is not False:
            raise ArchiveError(f"{kind} {fqn!r} is stored as a pickle, which Grid never loads; save plain tensors only")
        if not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise ArchiveError(f"{kind} {fqn!r} is a custom or opaque object, which Grid never loads")


def check_archive(file: str | IO[bytes], *, max_unpacked_bytes: int) -> ArchiveInfo:
    """Validate an exported-program archive and return its input names.

    Raises ArchiveError with a message that says what is wrong and how to fix it.
    Reads only the zip directory and the JSON entries; never unpickles.
    """
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError):
        raise ArchiveError(NOT_A_PROGRAM) from None
    with archive:
        infos = archive.infolist()
        if not infos:
            raise ArchiveError(NOT_A_PROGRAM)
        roots = {_relative(i.filename)[0] for i in infos}
        if len(roots) != 1:
            raise ArchiveError(f"the archive has {len(roots)} top-level folders; {NOT_A_PROGRAM}")
        root = roots.pop()

        total = 0
        models: list[zipfile.ZipInfo] = []
        for info in infos:
            _, rel = _relative(info.filename)
            if info.is_dir():
                continue
            if not any(p.fullmatch(rel) for p in _ALLOWED):
                raise ArchiveError(f"the archive contains {info.filename!r}, which an exported program never contains; {NOT_A_PROGRAM}")
            total += info.file_size
            if rel.startswith("models/"):
                models.append(info)
            elif rel.endswith("_weights_config.json"):
                _check_payload_config(archive, info, "weight")
            elif rel.endswith("_constants_config.json"):
                _check_payload_config(archive, info, "constant")
        if total > max_unpacked_bytes:
            raise ArchiveError(f"the archive unpacks to {total} bytes, over the limit of {max_unpacked_bytes}")
        if [_relative(m.filename)[1] for m in models] != ["models/model.json"]:
            raise ArchiveError(f"the archive must hold exactly one program, models/model.json; {NOT_A_PROGRAM}")
        try:
            if _read_entry(archive, f"{root}/archive_format").strip() != b"pt2":
                raise ArchiveError(f"archive_format is not 'pt2'; {NOT_A_PROGRAM}")
        except KeyError:
            raise ArchiveError(f"archive_format is missing; {NOT_A_PROGRAM}") from None

        program = _read_json(archive, models[0])
        return ArchiveInfo(root=root, input_names=_user_input_names(program), unpacked_bytes=total)


def _user_input_names(program: Any) -> list[str]:
    try:
        specs = program["graph_module"]["signature"]["input_specs"]
        names = [s["user_input"]["arg"]["as_tensor"]["name"] for s in specs if "user_input" in s]
    except (KeyError, TypeError):
        raise ArchiveError(f"models/model.json has no readable input signature; {NOT_A_PROGRAM}") from None
    if not names or not all(isinstance(n, str) for n in names):
        raise ArchiveError("the program takes no tensor inputs; Grid serves programs whose inputs are tensors")
    return names


def write_loadable_copy(source: str, destination: str) -> None:
    """Copy a checked archive, emptying its sample-input entry.

    torch deserializes an empty sample-input entry as "no sample inputs"
    without calling torch.load, so the copy loads with no pickle at all.
    """
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            rel = _relative(info.filename)[1]
            if rel.startswith(SAMPLE_INPUTS_PREFIX):
                dst.writestr(info.filename, b"")
                continue
            with src.open(info) as reader, dst.open(info.filename, "w", force_zip64=True) as writer:
                while chunk := reader.read(1 << 20):
                    writer.write(chunk)
