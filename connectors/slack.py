"""Slack Web API client on slack-sdk: post a message, update it later."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any
from urllib.error import URLError

import anyio.to_thread
from pydantic import SecretStr
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from cxrelay.connectors.retry import retry_after_seconds
from cxrelay.core.errors import OutcomeUnknown, PermanentError, RetryableError

TRANSIENT_ERRORS = {"ratelimited", "internal_error", "fatal_error", "service_unavailable",
                    "request_timeout", "team_added_to_org"}
# Slack documents that with these "some aspect of the operation" may have succeeded; so may a
# 5xx answer's request. A write answered so is an unknown outcome: look before acting again.
MAYBE_DONE_ERRORS = {"internal_error", "fatal_error"}
DEFAULT_API_URL = "https://slack.com/api/"


@dataclass(frozen=True)
class SlackMessage:
    channel: str
    ts: str


class SlackMessageGone(PermanentError):
    """`chat.update` found no message to update (deleted in Slack)."""


def _never_sent(exc: BaseException) -> bool:
    """The request cannot have reached Slack: the connection was refused or the host unknown."""
    reason = exc.reason if isinstance(exc, URLError) else exc
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror))


class SlackClient:
    def __init__(self, bot_token: SecretStr, api_url: str = DEFAULT_API_URL,
                 timeout: float = 10.0) -> None:
        self.api_url = api_url if api_url.endswith("/") else api_url + "/"
        self._client = WebClient(token=bot_token.get_secret_value(), base_url=self.api_url,
                                 timeout=int(timeout))
        self._team_id: str | None = None

    def __repr__(self) -> str:
        return f"SlackClient(api_url={self.api_url!r})"

    def _call(self, method: str, read: bool = False, **kwargs: Any) -> dict[str, Any]:
        # Slack takes JSON bodies for write methods only; reads go form-encoded, as
        # slack-sdk's own conversations_history() sends them.
        try:
            if read:
                params = {k: str(v).lower() if isinstance(v, bool) else v
                          for k, v in kwargs.items()}
                response = self._client.api_call(method, params=params)
            else:
                response = self._client.api_call(method, json=kwargs)
        except SlackApiError as exc:
            error = str(exc.response.get("error", "")) if exc.response is not None else ""
            status = exc.response.status_code if exc.response is not None else 0
            headers = dict(exc.response.headers) if exc.response is not None else {}
            detail = f"Slack {method}: {error or 'HTTP ' + str(status)}"
            if not read and status != 429 and (status >= 500 or error in MAYBE_DONE_ERRORS):
                raise OutcomeUnknown(detail, retry_after=retry_after_seconds(headers)) from exc
            if status == 429 or status >= 500 or error in TRANSIENT_ERRORS:
                raise RetryableError(detail, retry_after=retry_after_seconds(headers)) from exc
            if error == "message_not_found":
                raise SlackMessageGone(detail) from exc
            raise PermanentError(detail) from exc
        except (SlackClientError, URLError, TimeoutError, OSError) as exc:
            detail = f"Slack {method}: {type(exc).__name__}"
            if not read and not _never_sent(exc):
                # Slack may have posted: no idempotency key, so the next attempt looks first.
                raise OutcomeUnknown(detail) from exc
            raise RetryableError(detail) from exc
        return dict(response.data) if isinstance(response.data, dict) else {}

    async def team_id(self) -> str:
        """The workspace of the bot token (`auth.test`, asked once): target health is kept per
        workspace."""
        if self._team_id is None:
            data = await anyio.to_thread.run_sync(lambda: self._call("auth.test", read=True))
            self._team_id = str(data.get("team_id") or "")
        return self._team_id

    async def post_message(self, channel: str, text: str,
                           metadata: dict[str, Any] | None = None) -> SlackMessage:
        options: dict[str, Any] = {"channel": channel, "text": text}
        if metadata:
            options["metadata"] = metadata
        data = await anyio.to_thread.run_sync(lambda: self._call("chat.postMessage", **options))
        return SlackMessage(channel=data["channel"], ts=data["ts"])

    async def find_message(self, channel: str, conversation_id: str, target: str,
                           limit: int = 200) -> SlackMessage | None:
        """Our message for this conversation among the channel's recent ones, recognised by
        its `cxrelay_delivery` metadata (`conversations.history`, scope channels:history)."""
        data = await anyio.to_thread.run_sync(lambda: self._call(
            "conversations.history", read=True, channel=channel, limit=limit,
            include_all_metadata=True))
        for message in data.get("messages") or []:
            metadata = message.get("metadata") or {}
            payload = metadata.get("event_payload") or {}
            # a digest names each conversation it shows
            shown = payload.get("conversation_ids") or [payload.get("conversation_id")]
            if (metadata.get("event_type") == "cxrelay_delivery"
                    and conversation_id in shown and payload.get("target") == target):
                return SlackMessage(channel=data.get("channel") or channel, ts=message["ts"])
        return None

    async def update_message(self, channel: str, ts: str, text: str) -> SlackMessage:
        data = await anyio.to_thread.run_sync(
            lambda: self._call("chat.update", channel=channel, ts=ts, text=text))
        return SlackMessage(channel=data.get("channel", channel), ts=data.get("ts", ts))
