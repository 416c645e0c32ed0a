"""End-to-end harness: a real Ray head started with `ray start --head` on 127.0.0.1, jobs sent with `ray job submit`,
HTTP to the Serve proxy.

The head runs in a session of its own (start_new_session) so that teardown can stop exactly the processes this
test started, by PID — never `ray stop`, which kills every Ray on the machine by name. Token auth stays on, as
Ray 2.60 ships it: the CLI client gets `RAY_AUTH_MODE=token`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """PIDs of every live process in session `sid` (field 6 of /proc/PID/stat)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def stop_session(sid: int, grace_s: float = 10.0) -> None:
    """SIGTERM every process of the session, then SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return


@dataclass
class RayHead:
    """A head started by this test: its dashboard URL, the client env, and its session id for teardown."""

    dashboard_url: str
    temp_dir: Path
    sid: int
    env: dict[str, str] = field(default_factory=dict)

    def submit(self, *entrypoint: str, timeout_s: float = 600, runtime_env_json: str | None = None) -> str:
        """`ray job submit --working-dir <project> -- <entrypoint>`; returns the job's log, raises with its tail on
        failure or time-out."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir", str(PROJECT_ROOT)]
        if runtime_env_json:
            cmd += ["--runtime-env-json", runtime_env_json]
        cmd += ["--", *entrypoint]
        for _ in range(20):  # the job agent comes up some seconds after the dashboard answers
            try:
                done = subprocess.run(
                    cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT
                )
            except subprocess.TimeoutExpired as exc:
                tail = (exc.stdout or "")[-4000:] if isinstance(exc.stdout, str) else ""
                raise AssertionError(f"job {' '.join(entrypoint)} timed out after {timeout_s}s; log tail:\n{tail}") from None
            log = done.stdout + done.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(3)
        if done.returncode != 0:
            raise AssertionError(f"job {' '.join(entrypoint)} exited {done.returncode}; log tail:\n{log[-6000:]}")
        return log

    def run(self, *cmd: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """A client command (serve deploy, serve status, ...) against this head."""
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT, check=False
        )


START_ATTEMPTS = 3  # a loaded machine can miss the raylet's fixed 15 s wait for its dashboard agent; try afresh


def launch_head(log_dir: Path, attempt: int) -> tuple[subprocess.Popen, RayHead, Path]:
    """`ray start --head --block` in a session of its own, every listening port explicit (other Rays on this
    machine hold the defaults); returns the process, the client handle and its log file."""
    temp_dir = Path("/tmp") / f"mzr_e2e_{os.getpid()}_{attempt}"  # short: Ray's socket paths must stay under 107 bytes
    gcs_port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # the job's `mengzi-ray` and `python` come from this venv
        "RAY_AUTH_MODE": "token",
        # the head's own token, shared with its clients through the environment: a fresh machine has no
        # ~/.ray/auth_token, and `ray start` does not create one
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "PYTHONUNBUFFERED": "1",  # `ray start --block` writes its "Ray runtime started." to a file: no buffering
    }
    env.pop("RAY_ADDRESS", None)
    log_path = log_dir / f"ray_start_{attempt}.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [
                str(BIN / "ray"), "start", "--head", "--block",
                "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=PROJECT_ROOT,
        )
    url = f"http://127.0.0.1:{dashboard_port}"
    return head, RayHead(url, temp_dir, sid=head.pid, env={**env, "RAY_API_SERVER_ADDRESS": url}), log_path


def start_head(tmp_path_factory) -> Iterator[RayHead]:
    """Start a head, yield it, stop it by its session's PIDs (a generator for a pytest fixture).

    Ready means `ray start` printed "Ray runtime started." (the raylet registered: the job API can answer before
    that and the raylet still die) and `ray job list` answers. A head that dies while starting is stopped and
    started again, up to START_ATTEMPTS times; one not ready after 120 s is a failure, with its log."""
    log_dir = tmp_path_factory.mktemp("ray_head")
    for attempt in range(1, START_ATTEMPTS + 1):
        head, ready, log_path = launch_head(log_dir, attempt)
        try:
            if wait_until_ready(head, ready, log_path, last_attempt=attempt == START_ATTEMPTS):
                yield ready
                return
        finally:
            stop_session(head.pid)


def wait_until_ready(head: subprocess.Popen, ready: RayHead, log_path: Path, last_attempt: bool) -> bool:
    """True once the head is up; False when it died and another attempt may follow; AssertionError otherwise."""
    deadline = time.monotonic() + 120
    while True:
        if "Ray runtime started." in log_path.read_text(errors="replace"):
            probe = ready.run(str(BIN / "ray"), "job", "list", "--address", ready.dashboard_url, timeout_s=60)
            if probe.returncode == 0 and head.poll() is None:
                return True
        died = head.poll() is not None
        if died and not last_attempt:
            return False
        if died or time.monotonic() > deadline:
            raise AssertionError(f"ray start --head did not come up:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(2)
