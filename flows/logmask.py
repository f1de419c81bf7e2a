"""Callers' numbers masked in what the process logs, tracebacks included.

cxrelay's own errors mask their text (`cxrelay.core.errors`), but a traceback Prefect logs
(a failed task run) also prints the errors they were raised from: simple-salesforce's carry
the request's URL and body. A filter on the handlers of Prefect's and cxrelay's loggers masks
every record's message and traceback before any handler (the Prefect API's among them) sees it.
"""

from __future__ import annotations

import logging

from cxrelay.core.redact import mask_text

LOGGERS = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "cxrelay")


class MaskNumbers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_FILTER = MaskNumbers()


def mask_numbers_in_logs() -> None:
    """Add the filter to every handler of those loggers (once each; new handlers too)."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
