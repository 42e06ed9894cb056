"""Every command and subcommand answers --help and -h with its usage (exit 0)."""

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [
    ["blisswriter"],
    ["blisswriter", "run"],
    ["blisswriter", "status"],
    ["blisswriter", "validate"],
    ["blisswriter", "rewrite"],
    ["blisswriter", "serve"],
    ["blissdata-simulate"],
    ["blissdata-memory-tracker"],
    ["blissdata-replay"],
]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command, flag):
    done = subprocess.run([str(BIN / command[0]), *command[1:], flag], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {' '.join(command)}"), done.stdout
    assert not done.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_redis_server(flag):
    done = subprocess.run([sys.executable, "-m", "blissdata.redis_server", flag],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(
        "usage: python3 -m blissdata.redis_server"), done.stdout + done.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_demo_and_dev(flag):
    demo = subprocess.run([sys.executable, "-m", "writer.commands.demo", flag], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert demo.returncode == 0 and demo.stdout.startswith("usage: python3 dev.py demo")
    dev = subprocess.run([sys.executable, str(ROOT / "dev.py"), flag], capture_output=True,
                         text=True, timeout=60)
    assert dev.returncode == 0 and "python3 dev.py test" in dev.stdout


def test_rewrite_without_arguments_says_what_is_missing():
    done = subprocess.run([str(BIN / "blisswriter"), "rewrite"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "input, output" in done.stderr
