"""What a new user reads and types: the default configuration lists every setting, help and
error messages say what is true."""

import dataclasses
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from writer.commands.cli import main as cli_main
from writer.service.config import WriterConfig, load_config
from writer_helpers import seed_scan, wait_status

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "writer.toml"


def test_default_config_lists_every_setting_with_its_default():
    listed = tomllib.loads(CONFIG.read_text())
    schema = json.loads((ROOT / "writer" / "service" / "config_schema.json").read_text())
    assert set(listed) == set(schema["properties"])
    assert set(listed["metrics"]) == set(schema["properties"]["metrics"]["properties"])
    defaults = {f.name: getattr(WriterConfig(), f.name) for f in dataclasses.fields(WriterConfig)
                if f.name != "source"}
    assert listed["compression"].pop("streams") == {}  # per-stream overrides: none by default
    assert listed == defaults
    assert listed["metrics"]["host"] == "127.0.0.1"  # not every interface unless asked


def test_config_comment_example_matches_the_fixtures_stream(tmp_path):
    example = re.search(r'^# ("[^"]+" = "gzip")', CONFIG.read_text(), re.M).group(1)
    config = tmp_path / "w.toml"
    config.write_text(f"data_roots = [\"{tmp_path}\"]\n[compression.streams]\n{example}\n")
    streams = [s["name"] for s in json.loads((ROOT / "fixtures" / "mca.json").read_text())
               ["streams"]]
    assert "mca:spectrum" in streams
    assert load_config(config).compression_for("mca:spectrum")["name"] == "gzip"


def test_run_help_states_the_redis_url_precedence(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: REDIS_URL, then the config's redis_url)" in help_text
    assert "overridden by REDIS_URL, and both by --redis" in CONFIG.read_text()


def test_dev_py_names_an_unknown_command():
    done = subprocess.run([sys.executable, str(ROOT / "dev.py"), "foo"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert "unknown command 'foo' (known: demo, test)" in done.stderr


def test_scan_path_through_a_regular_file_is_a_clear_error(store, tmp_path, redis_url):
    from writer_helpers import start_writer

    root = tmp_path / "data"
    root.mkdir()
    (root / "sample").write_text("not a folder")
    service, thread = start_writer(redis_url, root)
    try:
        scan, _ = seed_scan(store, root / "sample" / "deeper" / "x.h5")
        status = wait_status(store, scan.key)
    finally:
        service.stop()
        thread.join(30)
    assert status.state == "failed"
    assert f"{root / 'sample'} is a file, not a folder" in status.error
    assert "File exists" not in status.error
