"""A real single-node Elasticsearch on 127.0.0.1 for the demo and the tests, without Docker.

``near2 es start`` downloads the runnable distribution
``org.elasticsearch.distribution.integ-test-zip:elasticsearch`` from Maven Central once, checks its
SHA-512, unpacks it, and starts it with a small heap, bound to loopback, security off (it is local
only). Elasticsearch refuses to run as root: when we are root, the server runs as the unprivileged
system user ``near2-es``, created on first use.

This minimal distribution has the core server (dense_vector, kNN, bulk, aliases, _meta) but no
Painless scripting, analysis-common, ingest pipelines, reindex or RRF. near2's core path uses none of
them; the official image in docker-compose.yml has them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from near2_tasks.config import LocalElasticsearchSettings, Settings
from near2_tasks.errors import Near2Error, ServiceUnavailable

ES_USER = "near2-es"
ARTIFACT = "org/elasticsearch/distribution/integ-test-zip/elasticsearch"


@dataclass(frozen=True)
class LocalServer:
    url: str
    pid: int
    version: str
    home: Path  # the unpacked distribution
    data_dir: Path
    log_file: Path


def _is_root() -> bool:
    return os.geteuid() == 0


def runtime_dir(settings: Settings) -> Path:
    """Where the server is unpacked and keeps data and logs.

    As root it must be readable by the unprivileged user, so it cannot live in root's home.
    """
    local = settings.local_elasticsearch
    if local.runtime_dir is not None:
        return local.runtime_dir
    if _is_root():
        return Path("/var/tmp/near2-elasticsearch")
    return settings.home / "elasticsearch"


def _cache_dir(settings: Settings) -> Path:
    return settings.local_elasticsearch.cache_dir or (settings.home / "cache" / "elasticsearch")


def _http_get(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()
    except (urllib.error.URLError, TimeoutError) as exc:
        raise ServiceUnavailable(
            f"cannot download {url}: {exc}",
            hint="check the network or place the zip in the cache directory by hand",
        ) from exc


def download(local: LocalElasticsearchSettings, cache_dir: Path) -> Path:
    """The distribution zip in the cache, downloaded and SHA-512 checked on first use."""
    name = f"elasticsearch-{local.version}.zip"
    target = cache_dir / name
    base = f"{local.maven_repository.rstrip('/')}/{ARTIFACT}/{local.version}/{name}"
    checksum_file = cache_dir / f"{name}.sha512"
    if not checksum_file.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        checksum_file.write_bytes(_http_get(base + ".sha512"))
    expected = checksum_file.read_text().split()[0].strip().lower()
    if target.exists() and _sha512(target) == expected:
        return target
    partial = target.with_suffix(".zip.part")
    print(f"downloading Elasticsearch {local.version} from {base} ...", flush=True)
    try:
        with urllib.request.urlopen(base, timeout=120) as resp, open(partial, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except (urllib.error.URLError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise ServiceUnavailable(f"cannot download {base}: {exc}") from exc
    actual = _sha512(partial)
    if actual != expected:
        partial.unlink(missing_ok=True)
        raise Near2Error(f"checksum mismatch for {name}: expected {expected[:16]}..., got {actual[:16]}...")
    partial.rename(target)
    return target


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_java(major_min: int = 17) -> Path:
    """A Java home of at least ``major_min``: ES_JAVA_HOME, JAVA_HOME, then ``java`` on PATH."""
    candidates = [os.environ.get("ES_JAVA_HOME"), os.environ.get("JAVA_HOME")]
    on_path = shutil.which("java")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    candidates += [str(p) for p in sorted(Path("/usr/lib/jvm").glob("*"))] if Path("/usr/lib/jvm").is_dir() else []
    for home in candidates:
        if not home:
            continue
        java = Path(home) / "bin" / "java"
        if java.exists() and _java_major(java) >= major_min:
            return Path(home)
    raise Near2Error(
        f"no Java {major_min}+ runtime found for Elasticsearch",
        hint=f"install one (apt-get install openjdk-{major_min}-jre-headless) or set ES_JAVA_HOME",
    )


def _java_major(java: Path) -> int:
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return 0
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 else major


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


def install(settings: Settings) -> Path:
    """Download (once) and unpack the distribution; return its home directory."""
    local = settings.local_elasticsearch
    root = runtime_dir(settings)
    es_home = root / f"elasticsearch-{local.version}"
    if (es_home / "bin" / "elasticsearch").exists():
        return es_home
    archive = download(local, _cache_dir(settings))
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".unpack-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            extracted = zf.extract(info, staging)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(extracted, mode)
    (staging / f"elasticsearch-{local.version}").rename(es_home)
    shutil.rmtree(staging, ignore_errors=True)
    return es_home


def _url(local: LocalElasticsearchSettings) -> str:
    return f"http://{local.host}:{local.port}"


def _paths(settings: Settings) -> tuple[Path, Path, Path]:
    root = runtime_dir(settings)
    port = settings.local_elasticsearch.port
    return root / f"data-{port}", root / f"logs-{port}", root / f"es-{port}.pid"


def health(url: str, timeout: float = 2.0) -> dict | None:
    """Cluster health as a dict, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/_cluster/health", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, OSError):
        return None


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
        return LocalServer(url, pid, local.version, es_home, data_dir, log_dir / "near2-local.log")
    if health(url):
        raise Near2Error(
            f"something else already answers on {url}",
            hint="stop it, or choose another port with NEAR2_LOCAL_ELASTICSEARCH__PORT",
        )
    java_home = find_java(17 if local.version.startswith("8.") else 21)
    for directory in (data_dir, log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    pid_file.unlink(missing_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ES_JAVA_HOME": str(java_home),
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
    if _is_root():
        user = ensure_user()
        _chown_tree(runtime_dir(settings), user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        command = [runuser, "-u", ES_USER, "--", "env", *[f"{k}={v}" for k, v in env.items()], *command]
    started = time.monotonic()
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        raise Near2Error(
            f"Elasticsearch failed to start: {(result.stderr or result.stdout).strip()[-800:]}",
            hint=f"see the logs in {log_dir}",
        )
    _wait_healthy(url, pid_file, log_dir, local.start_timeout_s - (time.monotonic() - started))
    pid = _read_pid(pid_file) or 0
    return LocalServer(url, pid, local.version, es_home, data_dir, log_dir / "near2-local.log")


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
    if pid:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    info["rss_mib"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
    return info
