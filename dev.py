#!/usr/bin/env python3
"""The project's two entry points, each doing its own set-up on a fresh machine.

    python3 dev.py demo    # embedded Redis + writer + simulated scans -> NeXus files
    python3 dev.py test    # the whole test suite (starts its own Redis server)

Both create ./.venv (if missing) and install the project into it (again whenever
pyproject.toml changed). Extra arguments go to the demo / to pytest.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".installed-from"


def ensure_venv() -> None:
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    print("dev.py: installing the project and its dependencies into .venv", flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in ("demo", "test"):
        if argv:
            print(f"dev.py: unknown command {argv[0]!r} (known: demo, test)", file=sys.stderr)
        print(__doc__, file=sys.stderr if argv else sys.stdout)
        return 2
    ensure_venv()
    os.chdir(ROOT)
    if argv[0] == "demo":
        command = [str(PYTHON), "-m", "writer.commands.demo", *argv[1:]]
    else:
        command = [str(PYTHON), "-m", "pytest", *argv[1:]]
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
