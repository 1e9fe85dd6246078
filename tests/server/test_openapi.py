"""``/openapi.json`` lists every route the app really registers (with each of its methods), and nothing else:
the document is a hand-kept table, so a new route without its row fails here, in process, in a second."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Route

from inhouse.server.openapi import OPENAPI_PATH, build_openapi
from inhouse.server.routes.console import CONSOLE_PATH
from tests.server.test_app import build, settings_for


def test_every_registered_route_and_method_is_in_the_document(tmp_path: Path) -> None:
    app, _ = build(settings_for(tmp_path))
    registered = set()
    for route in app.routes:
        if getattr(route, "path", "").startswith(CONSOLE_PATH):  # the console's page and files: not the API
            continue
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # Starlette's {name:path} is OpenAPI's {name}
        registered |= {(method.lower(), path) for method in route.methods or () if method != "HEAD"}
    document = build_openapi("chat")  # as create_app builds it
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert ("get", OPENAPI_PATH) in registered
    assert {("post", "/admin/adapters"), ("delete", "/admin/adapters/{name}"), ("post", "/admin/reload"),
            ("post", "/admin/models/{name}/swap"), ("get", "/metrics/models")} <= registered
    assert registered - documented == set(), "routes missing from /openapi.json"
    assert documented - registered == set(), "documented routes the app does not serve"
