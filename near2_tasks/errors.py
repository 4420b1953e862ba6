"""User-facing errors: one line that names the problem and, where there is one, the fix."""

from __future__ import annotations


class Near2Error(Exception):
    """An expected failure (bad input, a service down, a missing tool).

    The CLI prints ``near2: error: <message>`` (and ``hint: <hint>``) and exits non-zero, without a
    traceback. Library callers (Airflow tasks) see an ordinary exception with the same message.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ServiceUnavailable(Near2Error):
    """Elasticsearch or MLflow cannot be reached."""

    exit_code = 3


class ValidationFailed(Near2Error):
    """Input data did not pass validation; the run must stop."""

    exit_code = 1
