"""The pickle-free check of uploaded exported programs."""

import io
import pickle
import zipfile

import pytest
import torch

from gridproto.pt2 import ArchiveError, check_archive, write_loadable_copy
from tests.models import export_bytes

LIMIT = 1 << 30


class RunsCommand:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_exported_program_accepted():
    info = check_archive(io.BytesIO(export_bytes()), max_unpacked_bytes=LIMIT)
    assert info.input_names == ["input"]
    assert info.unpacked_bytes > 0


def test_raw_pickle_rejected():
    with pytest.raises(ArchiveError) as caught:
        check_archive(io.BytesIO(pickle.dumps(RunsCommand())), max_unpacked_bytes=LIMIT)
    assert "not an exported program" in str(caught.value)


def test_torch_save_rejected():
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buffer)
    buffer.seek(0)
    with pytest.raises(ArchiveError) as caught:
        check_archive(buffer, max_unpacked_bytes=LIMIT)
    assert "data.pkl" in str(caught.value)


def _rewrite(data: bytes, replace: dict[str, bytes]) -> io.BytesIO:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            rel = info.filename.partition("/")[2]
            target.writestr(info.filename, replace.get(rel, source.read(info)))
        for rel, body in replace.items():
            if rel not in {i.filename.partition("/")[2] for i in source.infolist()}:
                target.writestr(f"archive/{rel}", body)
    out.seek(0)
    return out


def test_pickled_weight_rejected():
    data = export_bytes()
    config = zipfile.ZipFile(io.BytesIO(data)).read("archive/data/weights/model_weights_config.json")
    tampered = config.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
    with pytest.raises(ArchiveError) as caught:
        check_archive(_rewrite(data, {"data/weights/model_weights_config.json": tampered}), max_unpacked_bytes=LIMIT)
    assert "stored as a pickle" in str(caught.value)


def test_extra_entry_rejected():
    data = export_bytes()
    with pytest.raises(ArchiveError) as caught:
        check_archive(_rewrite(data, {"extra/payload.pkl": pickle.dumps(1)}), max_unpacked_bytes=LIMIT)
    assert "extra/payload.pkl" in str(caught.value)


def test_oversized_archive_rejected():
    with pytest.raises(ArchiveError) as caught:
        check_archive(io.BytesIO(export_bytes()), max_unpacked_bytes=10)
    assert "over the limit" in str(caught.value)


def test_loadable_copy_loads_without_pickle(tmp_path, monkeypatch):
    source = tmp_path / "model.pt2"
    source.write_bytes(export_bytes())
    copy = tmp_path / "copy.pt2"
    write_loadable_copy(str(source), str(copy))

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    program = torch.export.load(str(copy))
    assert program.module()(torch.ones(3, 4)).shape == (3, 3)
