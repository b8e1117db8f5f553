"""Run the project's command lines in subprocesses and check how they fail."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(script: str, *args, cwd=REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from the repository root, offline, with captured text output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """A user error: exit code 2, no traceback, at most two non-empty stderr lines besides one-line warnings, and
    the last one names each of ``names`` (the file, value or key at fault). Returns the message."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    context = f"exit {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stderr, context
    assert 1 <= len(lines) <= 2, context
    for name in names:
        assert name in lines[-1], f"{name!r} not in the last stderr line; {context}"
    return "\n".join(lines)
