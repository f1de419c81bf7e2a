"""The root of every error cxrelay raises on purpose.

Retry decisions are a type check: `RetryableError` is worth another attempt
(after `retry_after` seconds when the remote said so), `PermanentError` is not.
"""

from __future__ import annotations

from cxrelay.core.redact import mask_text


class CxrelayError(Exception):
    """Base class of cxrelay's own errors.

    Its text is masked (callers' phone numbers, see `cxrelay.core.redact`): it reaches logs,
    Prefect states and events, artifacts and the alert channel. `full_text` is the whole text,
    with `private` detail (names), for the dead letter in the store only."""

    private: str | None = None

    def __init__(self, *args: object) -> None:
        # The masked text is the exception's own (its args), so that `repr()` and tracebacks,
        # which Prefect logs, carry no number either; the whole text stays beside it.
        self._full = str(args[0]) if args else ""
        super().__init__(*(mask_text(arg) if isinstance(arg, str) else arg for arg in args))

    @property
    def full_text(self) -> str:
        text = getattr(self, "_full", None) or super().__str__()
        return f"{text} ({self.private})" if self.private else text


def full_text(exc: BaseException) -> str:
    """What the store keeps of an error: the unmasked text of cxrelay's own, `str` of others."""
    return exc.full_text if isinstance(exc, CxrelayError) else str(exc)


class RetryableError(CxrelayError):
    """A transient failure: a later attempt may succeed."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutcomeUnknown(RetryableError):
    """The request was sent and no answer came (a timeout, a connection lost mid-answer): the
    target may have acted on it. The next attempt looks before it acts again."""


class NotYetKnown(OutcomeUnknown):
    """An earlier attempt's outcome is still unknown and cannot be looked up yet (Jira's search
    lags its writes): look again in `again_in` seconds. Not the target's failure: it spends no
    attempt and does not pause the target."""

    def __init__(self, message: str, *, again_in: float) -> None:
        super().__init__(message)
        self.again_in = again_in


class NotThereYet(RetryableError):
    """The platform does not have the event's data yet (a CXone contact's data lands after
    its push), or asks us to wait (CXone's 429): look again in `again_in` seconds. Not the
    event's failure: it spends no attempt, and the event holds no slot while it waits."""

    def __init__(self, message: str, *, again_in: float) -> None:
        super().__init__(message, retry_after=again_in)
        self.again_in = again_in


class PermanentError(CxrelayError):
    """A failure that another attempt cannot fix; the work goes to the dead letters."""


class ConfigError(PermanentError):
    """A setting that a step needs is missing or invalid."""


class SignatureError(CxrelayError):
    """A webhook failed authentication. The message is safe to return to the caller."""


class EnvelopeError(CxrelayError):
    """A body parsed as JSON but is not a recognisable event."""

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class MappingError(PermanentError):
    """A mapping could not produce a valid payload (for example a required field is empty)."""
