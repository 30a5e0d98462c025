"""Secret masking for what Prefect itself logs: a filter on Prefect's run-log handlers.

Everything prefect-batchllm stores or logs is redacted where it is made (``describe_error``), and failures
reach Prefect as quiet, redacted ``AttemptFailed`` exceptions. This filter is the second line: any record
that passes Prefect's API (and console) handlers - a message, its arguments, a formatted traceback of some
exception we did not make - has the registered secrets (API keys) replaced by ``***`` before it is written
to the database, the console or a test's captured logs.
"""

from __future__ import annotations

import logging

from prefect_batchllm.core.errors import redact

__all__ = ["RedactSecretsFilter", "install_redaction"]

#: Loggers whose handlers ship run logs to the Prefect API (and the console, via the root logger).
_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.extra", "prefect", "")


class RedactSecretsFilter(logging.Filter):
    """Replace registered secrets in a record's message and formatted traceback (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler's own error path
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactSecretsFilter()


def install_redaction() -> None:
    """Attach the filter to Prefect's API/console handlers (idempotent; cheap enough to call per flow run)."""
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if name == "" and not type(handler).__module__.startswith("prefect"):
                continue  # the root logger: only Prefect's own console handler
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
