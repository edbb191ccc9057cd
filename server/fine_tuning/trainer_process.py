"""One `plait train` child process: started in its own process group, watched, and killed whole.

The server never imports the trainer. A job's trainer runs as `python -m plait.cli train` (the
command line is `contract.TrainerRun.command`) in the job's work folder, which is its current
directory: a repository-root `kernels/` on `sys.path` would shadow a package bitsandbytes
needs. Its output goes to the folder's log, and when it fails, `trainer_error` finds its own
words there. Killing the group takes with it anything the trainer started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from plait.server.fine_tuning.contract import ERROR_PREFIX, LOG_FILE, SERVER_PID_VARIABLE

log = logging.getLogger("plait.fine_tuning")

KILL_GRACE_SECONDS = 10.0  # SIGTERM first, SIGKILL after this
# Keys the trainer must not see: it publishes through the server's own code, not over HTTP.
_HIDDEN_ENVIRONMENT = ("PLAIT_API_KEY", "PLAIT_ADMIN_KEY")


class TrainerProcess:
    def __init__(self, command: list[str], work_dir: Path):
        env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_ENVIRONMENT}
        env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")  # progress comes through the events file
        env[SERVER_PID_VARIABLE] = str(os.getpid())
        with open(work_dir / LOG_FILE, "ab") as log_file:
            self.process = subprocess.Popen(
                command,
                cwd=work_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.work_dir = work_dir
        self.kill_sent: float | None = None  # monotonic time SIGTERM went to the group

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after `timeout` seconds; a trainer asked to
        stop that has not within the grace time is killed."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if self.kill_sent is not None and time.monotonic() - self.kill_sent > KILL_GRACE_SECONDS:
                _signal_group(self.pid, signal.SIGKILL)
            return None

    def terminate(self) -> None:
        """Ask the whole group to stop (SIGTERM now, SIGKILL after the grace time, through `wait`)."""
        if self.kill_sent is None:
            self.kill_sent = time.monotonic()
            _signal_group(self.pid, signal.SIGTERM)

    def kill_group(self) -> None:
        """Once the trainer has exited: whatever it started dies with it."""
        _signal_group(self.pid, signal.SIGKILL)

    def error(self, returncode: int) -> str:
        """Why the trainer failed, in its own words: its error line and the detail lines below it."""
        try:
            with open(self.work_dir / LOG_FILE, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - (64 << 10)))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        lines = text.replace(f"{self.work_dir}{os.sep}", "").splitlines()
        for index in range(len(lines) - 1, -1, -1):
            if lines[index].startswith(ERROR_PREFIX):
                details = []
                for line in lines[index + 1 :]:
                    if not line.startswith("  "):
                        break
                    details.append(line.strip())
                message = lines[index].removeprefix(ERROR_PREFIX)
                return message + (f" ({'; '.join(details)})" if details else "")
        if returncode < 0:
            return f"the trainer was killed by {signal.Signals(-returncode).name}"
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return f"the trainer exited with status {returncode}" + (f": {last}" if last else "")


def kill_leftover(pid: int | None, work_dir: Path) -> bool:
    """Stop a trainer that outlived its server (killed with SIGKILL), if `pid` is still that trainer."""
    if not pid:
        return False
    try:
        if Path(os.readlink(f"/proc/{pid}/cwd")) != work_dir.resolve():
            return False  # the pid is someone else's by now
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        return False
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the child leads its own group (start_new_session)
