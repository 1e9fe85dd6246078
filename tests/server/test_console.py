"""``/console`` and ``/metrics/models`` in process: the static files need no key and are not audited, the
numbers follow ``metrics_public``, and a missing file is the usual JSON 404."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

from inhouse.audit.writer import AuditWriter
from inhouse.keys.store import KeyStore
from inhouse.server.access import AccessParts
from inhouse.server.routes.console import HEADERS, STATIC_DIR
from inhouse.storage.database import Database
from tests.server.test_app import Server, bearer, chat, error_of, serving, settings_for


@contextlib.asynccontextmanager
async def keyed(tmp_path: Path, metrics_public: bool = True) -> AsyncIterator[tuple[Server, str, str]]:
    """Auth on: the app, an admin key's secret and an application key's."""
    db = Database(f"sqlite:///{tmp_path / 'inhouse.db'}")
    db.migrate()
    keys = KeyStore(db, cache_seconds=0)
    _, admin = keys.create("admin", admin=True)
    _, app = keys.create("app")
    settings = settings_for(tmp_path, auth="keys").model_copy(update={"metrics_public": metrics_public})
    try:
        async with serving(settings, AccessParts(db=db, keys=keys, audit=AuditWriter(db))) as server:
            yield server, admin, app
    finally:
        db.close()


def test_the_static_files_are_in_the_package() -> None:
    for name in ("index.html", "app.js", "api.js", "i18n.js", "style.css", "vendor/htm-preact-standalone.js",
                 "pages/playground.js", "pages/keys.js", "pages/audit.js", "pages/models.js", "pages/dify.js"):
        assert (STATIC_DIR / name).is_file(), name


def test_no_file_loads_anything_from_another_origin() -> None:
    for path in STATIC_DIR.rglob("*"):
        if path.suffix in {".html", ".js", ".css"}:
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"(from|import|src=|href=|url)\s*\(?\s*[\"']?(https?:)?//", text), path
            if path.parent.name != "vendor":  # the library names the SVG namespace, which is never fetched
                assert "http://" not in text and "https://" not in text, path


async def test_the_console_needs_no_key_and_leaves_no_audit_row(tmp_path: Path) -> None:
    async with keyed(tmp_path) as (server, admin, _):
        page = await server.client.get("/console/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for name, value in HEADERS.items():
            assert page.headers[name] == value
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        script = await server.client.get("/console/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        redirect = await server.client.get("/console")
        assert redirect.status_code == 307 and redirect.headers["location"] == "/console/"
        missing = await server.client.get("/console/missing.js")
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
        assert (await server.client.get("/console/..%2finhouse.db")).status_code == 404
        audit = await server.client.get("/admin/audit", headers=bearer(admin))
        assert audit.status_code == 200
        assert not [r for r in audit.json()["data"] if r["path"].startswith("/console")]


async def test_metrics_models_counts_calls_per_model(tmp_path: Path) -> None:
    async with keyed(tmp_path) as (server, _, app):
        answer = await server.client.post("/v1/chat/completions", json=chat(), headers=bearer(app))
        assert answer.status_code == 200
        numbers = await server.client.get("/metrics/models")  # public, as /metrics is by default
        assert numbers.status_code == 200
        counted = numbers.json()["models"]["chat"]
        assert (counted["requests"], counted["completion_tokens"], counted["errors"]) == (1, 3, 0)


async def test_metrics_models_needs_a_key_when_metrics_are_not_public(tmp_path: Path) -> None:
    async with keyed(tmp_path, metrics_public=False) as (server, _, app):
        refused = await server.client.get("/metrics/models")
        assert refused.status_code == 401 and error_of(refused)["code"] == "invalid_api_key"
        assert (await server.client.get("/metrics/models", headers=bearer(app))).status_code == 200
        assert (await server.client.get("/console/")).status_code == 200  # the page itself stays open


async def test_a_keyed_metrics_models_call_is_counted_under_its_own_route(tmp_path: Path) -> None:
    """Its calls are labelled ``/metrics/models``, not ``other`` (the metrics sink knows the console's routes)."""
    async with keyed(tmp_path, metrics_public=False) as (server, _, app):
        assert (await server.client.get("/metrics/models", headers=bearer(app))).status_code == 200
        scrape = (await server.client.get("/metrics", headers=bearer(app))).text
    counted = [line for line in scrape.splitlines() if line.startswith("inhouse_requests_total{")]
    assert any('route="/metrics/models"' in line and 'status="200"' in line for line in counted), counted


async def test_server_json_says_whether_keys_are_on_without_a_key(tmp_path: Path) -> None:
    """The page asks this, not an API route, before a key is pasted: no refused call per page load."""
    async with keyed(tmp_path) as (server, _, _):
        answer = await server.client.get("/console/server.json")
        assert answer.status_code == 200 and answer.json() == {"auth": "keys"}
        assert answer.headers["content-security-policy"] == HEADERS["Content-Security-Policy"]
    async with serving(settings_for(tmp_path / "open")) as server:
        assert (await server.client.get("/console/server.json")).json() == {"auth": "none"}
