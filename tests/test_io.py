import errno
import os

import pytest

from grpo.io import atomic_path, read_json, write_json


def test_failed_write_leaves_the_previous_file_and_no_temporaries(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_path(target, is_dir=True) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["a"]
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_what_a_killed_writer_left_is_recovered_before_the_next_write(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a").write_text("1")
    # killed between its two renames: the previous version moved aside, and its temporary left
    target.rename(tmp_path / ".model.old")
    (tmp_path / ".model.999999999.x.tmp").mkdir()  # a pid no process has
    live = tmp_path / f".model.{os.getpid()}.y.tmp"  # a writer still running keeps its own
    live.mkdir()
    with pytest.raises(RuntimeError), atomic_path(target, is_dir=True):
        raise RuntimeError("the next write fails too")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])


def test_a_full_disk_names_the_output_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    written = r"out.json was not written \(.*No space left.*previous version is kept"
    with pytest.raises(OSError, match=written), atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert read_json(target) == {"v": 1}
