"""`blisswriter validate`: real files, good and bad."""

import h5py
import numpy as np

from writer.commands.cli import main as cli_main
from writer.commands.validate import validate_file


def good_file(path):
    with h5py.File(path, "w") as f:
        f.attrs["NX_class"] = "NXroot"
        f.attrs["default"] = "entry"
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e.attrs["default"] = "data"
        e["start_time"] = "2026-11-24T10:00:00+01:00"
        d = e.create_group("data")
        d.attrs["NX_class"] = "NXdata"
        d.attrs["signal"] = "counts"
        d.attrs["axes"] = ["x"]
        d["counts"] = np.arange(5.0)
        d["x"] = np.arange(5.0)
        d["x"].attrs["units"] = "mm"


def test_valid_file_exits_0(tmp_path, capsys):
    path = tmp_path / "good.h5"
    good_file(path)
    report = validate_file(path)
    assert report.ok, report.errors
    assert cli_main(["validate", str(path)]) == 0
    assert "OK, 0 errors" in capsys.readouterr().out


def test_errors_are_found_and_named(tmp_path, capsys):
    path = tmp_path / "bad.h5"
    good_file(path)
    with h5py.File(path, "a") as f:
        del f["entry/start_time"]
        f["entry/start_time"] = "yesterday, around noon"  # not ISO 8601
        f["entry/data"].attrs["signal"] = "missing_field"
    report = validate_file(path)
    assert report.errors
    assert any("/entry" in e for e in report.errors)
    assert cli_main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "error:" in out


def test_missing_and_non_hdf5_files(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    assert cli_main(["validate", str(tmp_path / "nope.h5")]) == 2
    assert cli_main(["validate", str(text)]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "not an HDF5 file" in err and "Traceback" not in err
