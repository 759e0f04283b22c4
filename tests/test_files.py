"""The one atomic writer (data.atomic_path) and sample.py's --out: permissions from the umask, whole-folder
publishing, and a reused --out refused before any work unless --overwrite."""
import os

import pytest

import data
import sample


def test_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        data.write_json({"a": 1}, tmp_path / "f.json")
        with data.atomic_path(tmp_path / "d", directory=True) as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750 and (tmp_path / "d" / "x").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]          # no temporary left behind


def test_a_failed_folder_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    with data.atomic_path(tmp_path / "d", directory=True) as d:
        (d / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with data.atomic_path(tmp_path / "d", directory=True) as d:
            (d / "new").write_text("new")
            raise RuntimeError("crash")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["old"] and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_reused_out_is_refused_before_any_work_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.png").write_text("from an earlier run")
    cache = str(tiny["llava"].parents[1])
    args = ["--tiny", "--cache", cache, "--prompt", "a photo of a cat", "--steps", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        sample.main(args + ["--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err and (out / "stale.png").exists()
    assert sample.main(args + ["--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.png").exists() and (out / "image.png").is_file()      # replaced whole
    for bad, why in ((str(out / "image.png"), "is a file"), ("", "is empty")):
        with pytest.raises(SystemExit):
            sample.main(args + ["--out", bad])
        assert why in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_guidance_scale_is_checked_before_any_work(tiny, tmp_path, capsys, value):
    args = ["--tiny", "--cache", str(tiny["llava"].parents[1]), "--prompt", "a photo of a cat", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        sample.main(args + ["--cfg", value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--cfg must be at least 0" in err and not (tmp_path / "o").exists()
