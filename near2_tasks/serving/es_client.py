"""The Elasticsearch client, built from settings, and one translation of its failures into Near2Error.

Every module that talks to Elasticsearch gets its client from :func:`make_client` and wraps its calls in
:func:`es_errors`, so an unreachable server reads the same everywhere: one line naming the URL (without
credentials) and the fix, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from near2_tasks.errors import Near2Error, ServiceUnavailable

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

    from near2_tasks.config import Settings

    from near2_tasks.serving.settings import ElasticsearchSettings



def redact_url(url: str) -> str:
    """``https://user:secret@host:9200`` -> ``https://host:9200``: URLs in messages never carry secrets."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _es_section(settings: Settings | ElasticsearchSettings) -> ElasticsearchSettings:
    return getattr(settings, "elasticsearch", settings)  # type: ignore[return-value]


def make_client(settings: Settings | ElasticsearchSettings) -> Elasticsearch:
    """A client for the configured cluster: API key or basic auth, CA certificates, timeouts, retries."""
    from elasticsearch import Elasticsearch

    es = _es_section(settings)
    options: dict = {
        "request_timeout": es.request_timeout,
        "max_retries": es.max_retries,
        "retry_on_timeout": True,
        "retry_on_status": (502, 503, 504),
    }
    if es.api_key:
        options["api_key"] = es.api_key
    elif es.username:
        options["basic_auth"] = (es.username, es.password or "")
    if es.ca_certs:
        if not es.ca_certs.is_file():
            raise Near2Error(
                f"elasticsearch.ca_certs {es.ca_certs} does not exist",
                hint="point NEAR2_ELASTICSEARCH__CA_CERTS at the cluster's CA certificate (PEM)",
            )
        options["ca_certs"] = str(es.ca_certs)
    try:
        return Elasticsearch(es.url, **options)
    except ValueError as exc:  # a malformed URL
        raise Near2Error(
            f"invalid elasticsearch.url {redact_url(es.url)!r}: {exc}",
            hint="use a URL like http://127.0.0.1:9200",
        ) from exc


def unavailable(url: str, reason: str = "") -> ServiceUnavailable:
    detail = f" ({reason})" if reason else ""
    return ServiceUnavailable(
        f"Elasticsearch at {redact_url(url)} is not reachable{detail}",
        hint="start it with `near2 es start`, or set NEAR2_ELASTICSEARCH__URL to a running cluster",
    )


def error_reason(exc: Exception) -> str:
    """The server's one-line reason from an ApiError (``type: reason``), else the exception text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        root = (error.get("root_cause") or [error])[0]
        return f"{root.get('type', 'error')}: {root.get('reason', '')}".strip()
    message = getattr(exc, "message", None) or str(exc)
    return str(message).splitlines()[0] if message else type(exc).__name__


def item_reason(error: Any) -> str:
    """``type: reason`` of one failed bulk item (its ``error`` is a dict, or a string for exceptions)."""
    if isinstance(error, dict):
        return f"{error.get('type', 'error')}: {error.get('reason', '')}"
    return str(error)


@contextmanager
def es_errors(url: str, action: str = "", keep_not_found: bool = False) -> Iterator[None]:
    """Turn transport failures into ServiceUnavailable, and refusals (auth, 4xx) into Near2Error.

    ``keep_not_found``: let NotFoundError through, for callers that treat a vanished index as a
    signal (search re-reads the alias).
    """
    from elasticsearch import (
        AuthenticationException,
        AuthorizationException,
        ConnectionError as ESConnectionError,
        ConnectionTimeout,
    )
    from elasticsearch import ApiError

    try:
        yield
    except ConnectionTimeout as exc:
        raise unavailable(url, f"timed out{' during ' + action if action else ''}") from exc
    except ESConnectionError as exc:
        raise unavailable(url) from exc
    except (AuthenticationException, AuthorizationException) as exc:
        raise Near2Error(
            f"Elasticsearch at {redact_url(url)} refused the credentials{' for ' + action if action else ''}: "
            f"{error_reason(exc)}",
            hint="check NEAR2_ELASTICSEARCH__API_KEY (or USERNAME/PASSWORD) and its privileges",
        ) from exc
    except ApiError as exc:
        if exc.meta.status in (502, 503, 504):
            raise unavailable(url, f"HTTP {exc.meta.status}") from exc
        if keep_not_found and exc.meta.status == 404:
            raise
        raise Near2Error(
            f"Elasticsearch refused {action or 'the request'} (HTTP {exc.meta.status}): {error_reason(exc)}"
        ) from exc
