"""Every ```python and ```bash block of README.md and docs/*.md runs, as printed.

How a page runs (the convention, also in docs/api.md "Examples are tested"):

- Its blocks run in order, each in a process of its own, in one fresh folder, like a reader
  following the page in one terminal: `REDIS_URL` names the suite's Redis server (flushed
  first), the project's commands are on PATH. A block fails the test if it exits non-zero.
- An HTML comment right before a block changes how it runs (use sparingly):
  - ``<!-- docs-test: background -->``: started, and the next blocks run while it does (a
    reader that follows the scans the next block publishes), once it waits in Redis (a
    blocked client: it will see what comes next). It must end by itself, exit 0, by the end
    of the page.
  - ``<!-- docs-test: service -->``: a service that runs until Ctrl-C, started the same way
    (ready once it waits in Redis or wrote a line, e.g. its start-up log). At the end of
    the page it gets SIGINT and must exit 0.
  - ``<!-- docs-test: skip: REASON -->``: not run; the reason is required.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_TIMEOUT_S = 120
_BLOCK = re.compile(r"^```(?P<lang>[\w+-]*)[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<what>(?:(?!-->).)*?)\s*-->\s*\Z", re.S)
MODES = ("run", "background", "service", "skip")


class DocsError(ValueError):
    """A malformed docs-test marker; the message names the page and line."""


@dataclass
class Block:
    page: str
    line: int  # of the opening fence
    lang: str
    code: str
    mode: str = "run"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def extract(text: str, page: str) -> list[Block]:
    """The python and bash blocks of a Markdown page, with their docs-test marker."""
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        lang = match["lang"]
        before = text[:match.start()].rstrip()
        marker = _MARKER.search(before[-300:] if len(before) > 300 else before)
        mode, reason = "run", ""
        if marker:
            what = marker["what"]
            mode, _, reason = what.partition(":")
            mode, reason = mode.strip(), reason.strip()
            if mode not in MODES[1:]:
                raise DocsError(f"{page}:{line}: unknown docs-test marker {what!r} "
                                f"(known: background, service, skip: REASON)")
            if mode == "skip" and not reason:
                raise DocsError(f"{page}:{line}: 'docs-test: skip' needs a reason "
                                f"('<!-- docs-test: skip: why -->')")
        if lang not in ("python", "bash"):
            if marker:
                raise DocsError(f"{page}:{line}: docs-test marker on a {lang or 'plain'} "
                                f"block, which never runs")
            continue
        blocks.append(Block(page, line, lang, match["code"], mode, reason))
    return blocks


def _blocked_clients(client) -> int:
    return int(client.info("clients")["blocked_clients"])


class PageRun:
    """Runs one page's blocks in `folder`, against the server at `redis_url`."""

    def __init__(self, folder: Path, redis_url: str):
        self.folder = folder
        self.redis = redis.Redis.from_url(redis_url)
        self.env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.running: list[tuple[Block, subprocess.Popen, Path]] = []

    def start(self, block: Block, n: int) -> tuple[subprocess.Popen, Path]:
        suffix = "py" if block.lang == "python" else "sh"
        script = self.folder / f"block{n:02d}_line{block.line}.{suffix}"
        script.write_text(block.code)
        command = [sys.executable, script.name] if block.lang == "python" \
            else ["bash", "-e", "-o", "pipefail", script.name]
        log = script.with_suffix(".log")
        # a session of its own: Ctrl-C (SIGINT) goes to the block's whole process group, as
        # a terminal sends it, so `bash` and the command it runs both get it
        proc = subprocess.Popen(command, cwd=self.folder, env=self.env, start_new_session=True,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        return proc, log

    @staticmethod
    def fail(block: Block, log: Path, why: str):
        pytest.fail(f"{block.where} ({block.lang} block) {why}; its output:\n"
                    f"{log.read_text(errors='replace')[-3000:]}", pytrace=False)

    def run(self, block: Block, n: int) -> None:
        blocked = _blocked_clients(self.redis)
        proc, log = self.start(block, n)
        if block.mode in ("background", "service"):
            self._wait_ready(block, proc, log, blocked)
            self.running.append((block, proc, log))
            return
        try:
            code = proc.wait(BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            self.fail(block, log, f"did not end within {BLOCK_TIMEOUT_S} s")
        if code != 0:
            self.fail(block, log, f"exited with {code}")

    def _wait_ready(self, block, proc, log, blocked_before) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail(block, log, f"ended (exit {proc.returncode}) before the next blocks")
            if _blocked_clients(self.redis) > blocked_before:
                return
            if block.mode == "service" and log.stat().st_size:
                return
            time.sleep(0.05)
        self.fail(block, log, "did not get ready (wait in Redis"
                              f"{' or write a line' if block.mode == 'service' else ''}) "
                              f"within 30 s")

    def finish(self) -> None:
        """Services get Ctrl-C; every background block must have ended, exit 0."""
        for block, proc, log in self.running:
            if block.mode == "service" and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for block, proc, log in self.running:
            try:
                code = proc.wait(BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill(proc)
                self.fail(block, log, f"still running {BLOCK_TIMEOUT_S} s after the page's "
                                      f"last block")
            if code != 0:
                self.fail(block, log, f"exited with {code}")

    @staticmethod
    def kill(proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the block and whatever it started
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        for _, proc, _ in self.running:
            self.kill(proc)
        self.redis.close()


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run_as_printed(page, redis_url, redis_client, tmp_path):
    blocks = extract(page.read_text(), str(page.relative_to(ROOT)))
    page_run = PageRun(tmp_path, redis_url)
    try:
        for n, block in enumerate(blocks):
            if block.mode != "skip":
                page_run.run(block, n)
        page_run.finish()
    finally:
        page_run.close()


def test_skips_are_few_and_say_why():
    blocks = [b for page in PAGES for b in extract(page.read_text(), page.name)]
    skipped = [b for b in blocks if b.mode == "skip"]
    assert len(blocks) >= 10, [b.where for b in blocks]
    assert len(skipped) <= 3, [f"{b.where}: {b.reason}" for b in skipped]


def test_markers_are_checked():
    page = ("text\n<!-- docs-test: skip: a signature listing -->\n```python\nf(...)\n```\n"
            "```bash\necho hi\n```\n```toml\nx = 1\n```\n"
            "<!-- docs-test: background -->\n\n```python\nwait()\n```\n")
    blocks = extract(page, "page.md")
    assert [(b.line, b.lang, b.mode, b.reason) for b in blocks] == [
        (3, "python", "skip", "a signature listing"), (6, "bash", "run", ""),
        (14, "python", "background", "")]
    with pytest.raises(DocsError, match=r"page.md:2: 'docs-test: skip' needs a reason"):
        extract("<!-- docs-test: skip -->\n```bash\nls\n```\n", "page.md")
    with pytest.raises(DocsError, match=r"page.md:2: unknown docs-test marker 'skipp: x'"):
        extract("<!-- docs-test: skipp: x -->\n```bash\nls\n```\n", "page.md")
    with pytest.raises(DocsError, match=r"page.md:2: docs-test marker on a toml block"):
        extract("<!-- docs-test: skip: x -->\n```toml\nx = 1\n```\n", "page.md")


def test_a_failing_example_fails_with_its_place_and_output(redis_url, redis_client, tmp_path):
    page_run = PageRun(tmp_path, redis_url)
    block = extract("# t\n\n```bash\necho $REDIS_URL\nfalse\necho never\n```\n", "t.md")[0]
    try:
        with pytest.raises(pytest.fail.Exception) as info:
            page_run.run(block, 0)
    finally:
        page_run.close()
    message = str(info.value)
    assert "t.md:3 (bash block) exited with 1" in message and redis_url in message
    assert "never" not in message


def test_the_demo_runs(tmp_path):
    """README's first block (skipped in the page: its second line is this very suite)."""
    done = subprocess.run([sys.executable, "-m", "writer.commands.demo", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "All good" in done.stdout


def test_the_private_server_command(tmp_path):
    """README: `python3 -m blissdata.redis_server` runs a server until Ctrl-C."""
    from blissdata.redis_server import _free_port

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "blissdata.redis_server", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"REDIS_URL=redis://127.0.0.1:{port} "), line
        assert redis.Redis(port=port).ping()
        again = subprocess.run([sys.executable, "-m", "blissdata.redis_server", "--port",
                                str(port)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "blissdata.redis_server:" in again.stderr
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in its terminal
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
