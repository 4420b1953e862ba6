"""Real services the fault tests may break on purpose: an Elasticsearch of their own, a real
``mlflow server``, and a loopback HTTP proxy that misbehaves in front of Elasticsearch.

None of these touch the shared server on 9200 or the test server on 9251: the dedicated
Elasticsearch has its own (free, per-session) port and its own runtime directory, and every process
here is one we started and stop by its own id. Two test sessions at once do not meet.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from near2_tasks.serving import elasticsearch_local
from near2_tasks.serving.elasticsearch_install import runtime_dir
from near2_tasks.config import Settings, load_settings


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_elasticsearch_port() -> int:
    """A free HTTP port whose transport port (+100, see elasticsearch_local) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 100 < 65536 and port_is_free(port + 100):
            return port
    raise RuntimeError("no free port pair for a dedicated Elasticsearch")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


# ----- Elasticsearch ---------------------------------------------------------------------------


class DedicatedElasticsearch:
    """A local Elasticsearch (``near2_tasks.serving.elasticsearch_local``) that only the fault tests use.

    ``kill()`` is a crash (SIGKILL, no shutdown); ``start()`` brings the same node back on the same
    data directory, so indices and aliases that were durable before the crash are there again.
    """

    def __init__(self, port: int, runtime_dir: Path, cache_dir: Path, home: Path) -> None:
        self.settings: Settings = load_settings(
            home=str(home),
            local_elasticsearch={
                "port": port,
                "runtime_dir": str(runtime_dir),
                "cache_dir": str(cache_dir),
                "heap": "384m",
            },
        )
        self.url = f"http://127.0.0.1:{port}"
        self.kills = 0

    def _path(self, kind: str) -> Path:  # the layout of elasticsearch_local: <runtime>/<kind>-<port>
        return runtime_dir(self.settings) / f"{kind}-{self.settings.local_elasticsearch.port}"

    @property
    def data_dir(self) -> Path:
        return self._path("data")

    @property
    def pid_file(self) -> Path:
        return runtime_dir(self.settings) / f"es-{self.settings.local_elasticsearch.port}.pid"

    def start_fresh(self) -> None:
        """Start on an empty data directory.

        Nothing listens on the port (the caller picked a free one), so whatever an aborted earlier session
        left under it is stale: its files are removed, and the pid it names is never signalled (reused)."""
        if not port_is_free(self.settings.local_elasticsearch.port):
            raise RuntimeError(f"port {self.settings.local_elasticsearch.port} is taken: choose another")
        self.wipe()
        self.start()

    def wipe(self) -> None:
        for directory in (self.data_dir, self._path("logs")):
            shutil.rmtree(directory, ignore_errors=True)
        self.pid_file.unlink(missing_ok=True)

    def start(self) -> None:
        elasticsearch_local.start(self.settings)

    def stop(self) -> None:
        elasticsearch_local.stop(self.settings)

    def kill(self) -> None:
        """Crash the node: SIGKILL, no chance to flush or say goodbye."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("the dedicated Elasticsearch is not running")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not elasticsearch_local.process_alive(pid), 30, "the killed Elasticsearch did not exit")
        self.kills += 1

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if elasticsearch_local.process_alive(pid) else None

    def is_up(self) -> bool:
        return elasticsearch_local.health(self.url) is not None

    def ensure_running(self) -> None:
        """Start it if its process is gone (a slow health answer is not a reason to start a second
        node on the same data), then wait until every primary is assigned again."""
        if self.pid() is None:
            self.start()
        wait_until(
            lambda: (elasticsearch_local.health(self.url, timeout=10) or {}).get("status") in ("green", "yellow"),
            180, "the dedicated Elasticsearch did not become yellow",
        )


# ----- MLflow --------------------------------------------------------------------------------------


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, one worker) in its own process group.

    Stopping and starting again keeps the port and the database, like a tracking server that went
    away for a while and came back.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tracking_uri = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifact_root = (self.root / "artifacts").as_uri()
        self.log_file = self.root / "server.log"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        if self.is_up():
            return
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--default-artifact-root", self.artifact_root, "--no-serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_up():
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.3)
        tail = self.log_file.read_text(errors="replace").splitlines()[-5:]
        self.stop()
        raise RuntimeError(f"mlflow server did not come up on {self.tracking_uri}: {' | '.join(tail)}")

    def stop(self) -> None:
        """Stop the server and its uvicorn worker (the process group we started)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        # the worker may outlive its parent by a moment: wait until the port is free again
        wait_until(lambda: not self.is_up(), 20, "mlflow server still answers after stop")

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False


# ----- a misbehaving proxy in front of Elasticsearch ---------------------------------------------


@dataclass
class ProxyRequest:
    method: str
    path: str
    body: bytes

    @property
    def is_bulk(self) -> bool:
        return urlsplit(self.path).path.rstrip("/").endswith("/_bulk")


@dataclass
class CannedResponse:
    status: int
    body: bytes = b"{}"
    content_type: str = "application/json"


#: Returned by a rule: close the connection without any answer, like a server that died.
DROP = object()

#: A rule sees each request before it is forwarded and returns None (forward it), DROP, or a
#: CannedResponse to answer instead of Elasticsearch.
Rule = Callable[[ProxyRequest], "CannedResponse | object | None"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authenticate", "proxy-authorization", "content-length"}


class FaultyProxy:
    """A tiny HTTP/1.1 forwarder on loopback in front of a real Elasticsearch.

    ``rule`` decides per request; ``seen`` counts requests by kind ("bulk" or "other") and
    ``answered`` counts what the proxy did ("forwarded", "dropped", "canned").
    """

    def __init__(self, upstream: str, rule: Rule | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 9200
        self.rule: Rule | None = rule
        self.seen: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = ProxyRequest(self.command, self.path, body)
                with proxy._lock:
                    proxy.seen["bulk" if request.is_bulk else "other"] += 1
                    rule = proxy.rule
                verdict = rule(request) if rule else None
                if verdict is DROP:
                    proxy._count("dropped")
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(verdict, CannedResponse):
                    proxy._count("canned")
                    self._reply(verdict.status, [("Content-Type", verdict.content_type)], verdict.body)
                    return
                try:
                    status, headers, payload = proxy._forward(request, dict(self.headers))
                except OSError:
                    proxy._count("dropped")  # upstream is down: so are we, as far as the client knows
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                proxy._count("forwarded")
                self._reply(status, headers, payload)

            def _reply(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                names = {name.lower() for name, _ in headers}
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                if "x-elastic-product" not in names:
                    self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)
        self._thread.start()

    def _count(self, what: str) -> None:
        with self._lock:
            self.answered[what] += 1

    def _forward(self, request: ProxyRequest, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            forward_headers = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(request.method, request.path, body=request.body or None, headers=forward_headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
