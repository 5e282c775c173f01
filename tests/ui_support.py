"""Helpers for the browser test: start ``dagster-webserver`` on loopback as its own process
group (always stopped again), find Debian's Chromium, launch it headless through Playwright.

Playwright's bundled browsers are never downloaded: the test drives the system ``chromium``
(installed by ``scripts/test.sh``) through ``executable_path``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MISSING_BROWSER = "run ./scripts/test.sh, which installs chromium"

# The shell that starts a background job may leave SIGINT ignored; an ignored signal stays
# ignored across exec, and Dagster's process tree then does not stop. Restore the defaults
# in a tiny wrapper before exec'ing the webserver.
_EXEC_WITH_DEFAULT_SIGNALS = (
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_DFL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def chromium_path() -> str:
    """Debian's chromium binary, or a clear failure telling how to get it (never a skip)."""
    import pytest

    path = os.environ.get("KMS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"chromium not found at {path}: {MISSING_BROWSER}", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(f"python playwright is not installed: {MISSING_BROWSER}", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webserver:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, path_prefix: str = ""):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.root = f"http://127.0.0.1:{port}"
        self.url = self.root + path_prefix

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Poll /server_info until it answers; fail early if the process died."""
        import json

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as resp:
                    return json.loads(resp.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(
            f"dagster-webserver did not answer on {self.url} within {timeout:.0f}s ({last}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group (webserver + code-server children), then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Children (the gRPC code server) may outlive the leader; the group id is the leader's pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


@contextlib.contextmanager
def dagster_webserver(
    env: dict, log_path: Path, *, workspace: Path = REPO / "workspace.yaml", path_prefix: str | None = None
) -> Iterator[Webserver]:
    """``dagster-webserver -w workspace.yaml -h 127.0.0.1 -p <free port> [--path-prefix P]`` in its own session."""
    port = free_port()
    exe = VENV_BIN / "dagster-webserver"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _EXEC_WITH_DEFAULT_SIGNALS,
                str(exe),
                "-w",
                str(workspace),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                *(["--path-prefix", path_prefix] if path_prefix else []),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Webserver(proc, port, log_path, path_prefix or "")
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def headless_chromium(executable: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
