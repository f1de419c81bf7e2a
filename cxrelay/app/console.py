"""What every `cxrelay` command shares: the consoles, settings and store, failing with one
clear line, tables of stored text, durations."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def load_settings():  # noqa: ANN202 - imported lazily so `cxrelay --help` stays fast
    """The settings a command acts with: with an orgs file, those of the org `--org` (or
    CXRELAY_ORG) names — its store, its credentials."""
    from cxrelay.core.errors import CxrelayError
    from cxrelay.settings import Settings

    settings = Settings()
    if settings.orgs and settings.org:
        try:
            return settings.for_org(settings.org)
        except CxrelayError as exc:
            fail(str(exc), 2)
    return settings


def select_org(org: str | None) -> str | None:
    """`--org`: the org a command acts on, for it and the flows it runs (CXRELAY_ORG)."""
    if org:
        os.environ["CXRELAY_ORG"] = org
    return org


def open_store():  # noqa: ANN202
    from cxrelay.store.database import Store

    settings = load_settings()
    return Store(settings.database_url, synchronous=settings.sqlite_synchronous)


def add_row(table: Table, *values: object) -> None:
    """A table row of stored text: cells are `Text`, never Rich markup (a stored `[/x]`
    would end the command, `[link=…]` would become a terminal hyperlink)."""
    table.add_row(*(Text(str(value)) for value in values))


def log_to_stderr(name: str) -> None:
    """INFO and above of this logger on stderr, timestamped (a child process of `serve`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def duration(text: str):  # noqa: ANN201 - timedelta, imported lazily
    """`90s`, `90m`, `2h`, `1d` (or plain minutes; `0m` too) as a timedelta, or a usage
    error."""
    from cxrelay.core.durations import DurationError
    from cxrelay.core.durations import parse_duration as parse

    try:
        return parse(text, default_unit="m", zero=True)
    except DurationError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_duration(text: str) -> int:
    """`90m`, `2h`, `1d` (or plain minutes) → whole minutes (at least one)."""
    return max(1, int(duration(text).total_seconds() // 60))


def since_moment(text: str | None):  # noqa: ANN202 - datetime, imported lazily
    """`2h` → the moment two hours ago (None for no limit)."""
    from datetime import datetime, timezone

    if text is None:
        return None
    return datetime.now(timezone.utc) - duration(text)
