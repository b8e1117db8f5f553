"""ldm.util.atomic_write: the one atomic file writer (concept files, masks, exports, the tokenizer folder)."""
import os

import pytest

from ldm.util import atomic_write


def test_atomic_write_file_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    assert atomic_write(path, lambda temporary: temporary.write_bytes(b"one")) == path
    atomic_write(str(path), lambda temporary: temporary.write_bytes(b"two"))
    assert path.read_bytes() == b"two" and os.listdir(path.parent) == ["a.bin"]


def test_atomic_write_failure_keeps_old_file_and_removes_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def half_then_fail(temporary):
        temporary.write_bytes(b"ha")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_folder_and_refused_replacement_of_a_full_folder(tmp_path):
    folder = tmp_path / "tok"

    def write(temporary):
        temporary.mkdir()
        (temporary / "vocab.json").write_text("{}")

    atomic_write(folder, write)
    assert os.listdir(folder) == ["vocab.json"]
    with pytest.raises(OSError):  # another process got there first: its folder stays, ours is removed
        atomic_write(folder, write)
    assert os.listdir(tmp_path) == ["tok"]
