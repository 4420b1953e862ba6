"""The local Elasticsearch's distribution: where it lives, its download and its unpacking.

``near2 es start`` (:mod:`near2_tasks.serving.elasticsearch_local`) downloads the runnable distribution
``org.elasticsearch.distribution.integ-test-zip:elasticsearch`` from Maven Central once, checks its
SHA-512 against the one pinned here (:data:`PINNED_SHA512`: Maven Central publishes none beside the 9.x
zips), and unpacks it into the runtime directory (:func:`runtime_dir`), which also holds each node's data,
logs, config and pid file.

This minimal distribution has the core server (dense_vector, kNN, bulk, aliases, _meta) but no
Painless scripting, analysis-common, ingest pipelines, reindex or RRF. near2's core path uses none of
them; the official image in docker-compose.yml has them all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from near2_tasks.config import Settings

from near2_tasks.serving.settings import LocalElasticsearchSettings
from near2_tasks.errors import Near2Error, ServiceUnavailable

ARTIFACT = "org/elasticsearch/distribution/integ-test-zip/elasticsearch"

#: SHA-512 of the distribution zips near2 has fetched and run, checked after every download. No checksum
#: file is published beside the 9.x zips; 8.19.21's equals the ``.sha512`` published beside it. Another
#: version needs ``local_elasticsearch.sha512``, or falls back to a published ``.sha512``.
PINNED_SHA512 = {
    "9.2.4": "5da6465950f7d26ca293794ead3d840f0698ce99bb15b5db7d10c19199e3431d"
             "ba21c83c737f4befa4fc282e12e5f215343a4cb7da52ac85e52b0c488e7b7057",
    "8.19.21": "cf6b0a93860d329937ae7f913ec5073b0c726c77639764b93fc83a304aa1dd9d"
               "4defcfa2849948eea3b0b47c2065f994908603939fc2a4774c9c4d868c5ec1dd",
}


def is_root() -> bool:
    """Whether we run as root (Elasticsearch refuses to: the server then runs as an unprivileged user)."""
    return os.geteuid() == 0


def runtime_dir(settings: Settings) -> Path:
    """Where the server is unpacked and keeps data and logs.

    As root it must be readable by the unprivileged user, so it cannot live in root's home.
    """
    local = settings.local_elasticsearch
    if local.runtime_dir is not None:
        return local.runtime_dir
    if is_root():
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
