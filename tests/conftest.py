from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

from cxrelay.sandbox.server import Sandbox
from cxrelay.store.database import Store

# Shared 2-core machines: generation speed is not what these tests are about.
settings.register_profile("cxrelay", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cxrelay")

SAMPLES = Path(__file__).parent / "samples"
# Every process a test starts (and what those start, even in sessions of their own) inherits
# this variable; whatever still runs after the test's teardown is killed, so no test leaks a
# process into the next one (a Prefect worker that outlived its SIGTERM once failed the next
# test). Set during the test's call only: the session's Prefect server starts in a fixture.
PROCESS_TAG = "CXRELAY_TEST_PROCESS_TAG"


def tagged_processes(tag: str) -> list[int]:
    found = []
    needle = f"{PROCESS_TAG}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    tag = uuid.uuid4().hex
    item.stash[_TAG_KEY] = tag
    os.environ[PROCESS_TAG] = tag
    try:
        yield
    finally:
        os.environ.pop(PROCESS_TAG, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield
    tag = item.stash.get(_TAG_KEY, None)
    if tag is None or not Path("/proc").is_dir():
        return
    import signal

    for pid in tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        print(f"\n[{item.nodeid}] left process {pid} running: killed")


_TAG_KEY = pytest.StashKey[str]()
POSTGRES_URL = os.environ.get("CXRELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def sample(name: str) -> dict[str, Any]:
    return json.loads((SAMPLES / name).read_text())


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox().start()
    yield box
    box.stop()


@pytest.fixture
def clean_sandbox(sandbox: Sandbox) -> Sandbox:
    for url in (sandbox.genesys_url, sandbox.salesforce_url, sandbox.slack_url.removesuffix("/api/"),
                sandbox.jira_url, sandbox.cxone_url):
        httpx.post(f"{url}/__sandbox/reset").raise_for_status()
    return sandbox


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Store(f"sqlite:///{tmp_path / 'cxrelay.db'}")
    yield db
    db.close()


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL.replace("postgresql://", "postgresql://", 1),
                             connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture
def pg_store() -> Iterator[Store]:
    """A store in a fresh schema of the PostgreSQL test database (never skipped in CI)."""
    if not postgres_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL}; CI must run these tests")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    db = Store(url)
    yield db
    db.close()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest) -> Store:
    """The same test on SQLite and on PostgreSQL."""
    return request.getfixturevalue("store" if request.param == "sqlite" else "pg_store")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server for the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from cxrelay.app.supervise import SQLITE_SERVER_SETTINGS

    # The harness's server is a subprocess that inherits these.
    for key, value in SQLITE_SERVER_SETTINGS.items():
        os.environ.setdefault(key, value)
    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())
