"""The web console (``/console``) in a real headless Chromium (Debian's ``chromium``, driven by Playwright's
Python API) against the real CLI with keys on: paste a key, stream a chat and see the tokens arrive, tool calls
and reasoning, the curl and Python snippets (run for real), create and revoke a key, the call in the audit view,
the models page, the Dify values, Chinese, and that the page asks nothing of any other origin.

One server and one browser for the module; the tests run in order on one page, as a person would.  Screenshots
go to the test's tmp dir; ``INHOUSE_CONSOLE_SCREENSHOTS=1`` also copies one per page to ``docs/images/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

from tests.e2e.helpers import admin_client, keyed_server, new_key
from tests.process import ADMIN_KEY, REPO, ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPLY = "Hello there my good friend, the console streams every word as it comes."
REASONING = "The user wants the weather, so I call the tool."
CONFIG = f"""
key_cache_seconds: 0.5
models:
  - {{name: echo, path: "{REPO}", engine: fake, context_length: 2048, fake_token_delay: 0.15,
     fake_reply: "{REPLY}"}}
  - {{name: agent, path: unused, engine: fake, tool_parser: hermes, reasoning_parser: think,
     fake_reply: '<think>{REASONING}</think> <tool_call>{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}
       </tool_call>'}}
  - {{name: minilm, engine: sentence-transformers, path: "builtin:all-minilm-l6-v2"}}
"""
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
DEADLINE_MS = 60_000  # generous: six engineers share two cores


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    with keyed_server(tmp_path_factory.mktemp("console"), CONFIG, cache_dir, logs_dir / "console.log") as s:
        yield s


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Page, str], Path]:
    folder = tmp_path_factory.mktemp("console-screenshots")
    keep = os.environ.get("INHOUSE_CONSOLE_SCREENSHOTS") == "1"

    def shoot(page: Page, name: str) -> Path:
        path = folder / f"console-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000  # a page was drawn, not a blank one
        if keep:
            shutil.copy(path, REPO / "docs" / "images" / path.name)
        return path

    return shoot


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


def new_context(browser: Browser, server: ServerProcess, locale: str = "en-US") -> BrowserContext:
    context = browser.new_context(viewport={"width": 1400, "height": 900}, locale=locale)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    context.set_default_timeout(DEADLINE_MS)
    return context


@pytest.fixture(scope="module")
def requested() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(browser: Browser, server: ServerProcess, requested: list[str]) -> Iterator[Page]:
    context = new_context(browser, server)
    page = context.new_page()
    page.on("request", lambda r: requested.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text
            else None)  # a refused call (401, 404) is logged by the browser; a CSP violation is an error too
    page.goto(server.url + "/console/")
    yield page
    context.close()
    assert errors == [], errors


def copied(page: Page, button: Any) -> str:
    """Click a copy button; the text it put on the clipboard (and keeps in data-copied)."""
    button.click()
    expected = button.get_attribute("data-copied")
    deadline = time.monotonic() + DEADLINE_MS / 1000
    while (text := page.evaluate("navigator.clipboard.readText()")) != expected and time.monotonic() < deadline:
        page.wait_for_timeout(50)  # the write is asynchronous
    assert text == expected
    return str(text)


def go(page: Page, name: str) -> None:
    page.click(f"a[data-page={name}]")
    page.wait_for_selector(f"main[data-page={name}]")


def test_the_console_is_served_from_the_package_without_a_key(server: ServerProcess) -> None:
    index = httpx.get(server.url + "/console/", timeout=30)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'src="app.js"' in index.text and "http" not in index.text.replace("http-equiv", "")
    library = httpx.get(server.url + "/console/vendor/htm-preact-standalone.js", timeout=30)
    assert library.status_code == 200 and "javascript" in library.headers["content-type"]
    bare = httpx.get(server.url + "/console", timeout=30)
    assert bare.status_code == 307 and bare.headers["location"] == "/console/"
    missing = httpx.get(server.url + "/console/nothing.js", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_paste_a_key_and_see_a_streamed_answer_arrive(page: Page, shots: Callable[[Page, str], Path]) -> None:
    page.fill("input[name=key]", ADMIN_KEY)
    page.click("button[name=use-key]")
    page.wait_for_selector(".pill.admin")
    assert page.evaluate("sessionStorage.getItem('inhouse.console.key')") == ADMIN_KEY
    assert page.evaluate("localStorage.length") == 0
    page.select_option("select[name=model]", "echo")
    page.fill("textarea[name=system]", "You are terse.")
    page.fill("textarea[name=prompt]", "Say hello")
    page.click("button[name=send]")
    answer = page.locator(".msg.assistant").last
    seen: list[str] = []
    deadline = time.monotonic() + DEADLINE_MS / 1000
    while answer.get_attribute("data-state") != "done" and time.monotonic() < deadline:
        text = answer.locator(".content").inner_text()
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        page.wait_for_timeout(50)
    assert answer.get_attribute("data-state") == "done"
    assert answer.locator(".content").inner_text() == REPLY
    partial = [s for s in seen if s != REPLY]
    assert len(partial) >= 2, f"tokens did not arrive one by one: {seen}"  # 13 words, 0.15 s apart
    assert all(REPLY.startswith(s) for s in partial)
    stats = answer.locator(".stats")
    assert int(stats.get_attribute("data-ttft") or "") >= 0
    assert float(stats.get_attribute("data-tps") or "") > 0
    assert "13 tokens" in stats.inner_text()


def test_reasoning_and_tool_calls_are_shown_as_such(page: Page, shots: Callable[[Page, str], Path]) -> None:
    page.click("text=Clear chat")
    page.select_option("select[name=model]", "agent")
    page.fill("textarea[name=tools]", json.dumps([WEATHER_TOOL]))
    page.fill("textarea[name=prompt]", "Weather in Paris?")
    page.click("button[name=send]")
    answer = page.locator(".msg.assistant[data-state=done]").last
    answer.wait_for()
    assert answer.locator(".reasoning pre").inner_text() == REASONING
    call = answer.locator(".toolcall code").inner_text()
    assert call.startswith("get_weather(") and json.loads(call[len("get_weather("):-1]) == {"city": "Paris"}
    assert "<tool_call>" not in answer.inner_text() and "<think>" not in answer.inner_text()
    shots(page, "playground")
    page.fill("textarea[name=tools]", "")


def test_the_curl_and_python_snippets_copy_and_run(page: Page, server: ServerProcess, tmp_path: Path) -> None:
    page.click("text=Clear chat")
    page.select_option("select[name=model]", "echo")
    page.fill("textarea[name=prompt]", "It's a test")  # a quote the shell snippet must escape
    python_code = page.locator("pre.code[data-lang=python]")
    expect(python_code).to_contain_text("It's a test", timeout=DEADLINE_MS)
    expect(python_code).to_contain_text('model="echo"', timeout=DEADLINE_MS)
    curl = copied(page, page.locator(".snippet", has_text="curl").locator("button.copy"))
    python = copied(page, page.locator(".snippet", has_text="Python").locator("button.copy"))
    assert ADMIN_KEY not in curl + python  # the key stays in the environment, never in a copied snippet
    env = {**os.environ, "INHOUSE_API_KEY": ADMIN_KEY}
    shell = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=env, timeout=120)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.rstrip().endswith("data: [DONE]")
    script = tmp_path / "snippet.py"
    script.write_text(python, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == REPLY


def test_create_copy_rotate_and_revoke_a_key(page: Page, server: ServerProcess,
                                             shots: Callable[[Page, str], Path]) -> None:
    go(page, "keys")
    name = f"dify-{time.time_ns()}"
    page.fill("form.create-key input[name=name]", name)
    page.fill("form.create-key input[name=models]", "echo")
    page.fill("form.create-key input[name=rpm]", "60")
    page.fill("form.create-key input[name=token_budget]", "100000")
    page.click("button[name=create]")
    secret = page.locator(".secret-value").inner_text()
    assert secret.startswith("ih-")
    assert copied(page, page.locator(".secret button.copy")) == secret
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["echo"]
        used = client.post("/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        assert used.status_code == 200
        row = page.locator(f"tr[data-key='{name}']")
        assert "60 rpm" in row.inner_text() and row.get_attribute("data-status") == "active"
        page.click("button[name=dismiss]")
        with admin_client(server) as admin:  # the audit log is written behind the answer: wait for the row
            deadline = time.monotonic() + 30
            while not [r for r in admin.get("/admin/audit", params={"key": name}).json()["data"]
                       if r["path"] == "/v1/chat/completions"] and time.monotonic() < deadline:
                time.sleep(0.2)
        page.reload()
        spent = used.json()["usage"]["total_tokens"]  # read from the audit log after the list: wait for it
        expect(page.locator(f"tr[data-key='{name}'] .budget")).to_contain_text(f"{spent} / 100000",
                                                                               timeout=DEADLINE_MS)
        shots(page, "keys")
        page.locator(f"tr[data-key='{name}'] button[name=rotate]").click()
        rotated = page.locator(".secret-value").inner_text()
        assert rotated.startswith("ih-") and rotated != secret
        page.click("button[name=dismiss]")
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {rotated}"}, timeout=30) as new:
            assert new.get("/v1/models").status_code == 200
            page.locator(f"tr[data-key='{name}'] button[name=revoke]").click()
            page.wait_for_selector(f"tr[data-key='{name}'][data-status=revoked]")
            for old in (client, new):
                deadline = time.monotonic() + 30
                while old.get("/v1/models").status_code != 401 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert old.get("/v1/models").status_code == 401


def test_the_call_appears_in_the_audit_view(page: Page, server: ServerProcess,
                                            shots: Callable[[Page, str], Path]) -> None:
    with admin_client(server) as admin:
        refused = admin.post("/v1/chat/completions", json={"model": "echo", "max_tokens": 5000,  # > 2048
                                                           "messages": [{"role": "user", "content": "hi"}]})
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        deadline = time.monotonic() + 30  # the audit log is written behind the answer: wait for the row
        while time.monotonic() < deadline:
            rows = admin.get("/admin/audit", params={"model": "echo", "limit": 2}).json()["data"]
            if rows[0]["request_id"] == refused.headers["x-request-id"]:
                break
            time.sleep(0.2)
        newest = rows[1]
    assert newest["status"] == 200
    go(page, "audit")
    page.fill("form.filters input[name=model]", "echo")
    page.fill("form.filters input[name=status]", "4xx")
    page.click("button[name=search]")
    # the first, unfiltered list is gone
    page.wait_for_function("() => (rows => rows.length > 0 && rows.every(r => r.dataset.status.startsWith('4')))"
                           "([...document.querySelectorAll('table.rows tbody tr')])")
    page.locator(f"tr[data-request-id='{refused.headers['x-request-id']}'][data-status='400']").wait_for()
    assert page.locator(f"tr[data-request-id='{newest['request_id']}']").count() == 0
    page.fill("form.filters input[name=status]", "2xx")
    page.click("button[name=search]")
    row = page.locator(f"tr[data-request-id='{newest['request_id']}']")
    row.wait_for()  # the 2xx search has replaced the 4xx one
    shown = page.locator("table.rows tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.model, r.dataset.status])")
    assert shown and all(model == "echo" and status.startswith("2") for model, status in shown)
    row.click()
    expect(page.locator(".detail")).to_contain_text(newest["request_id"], timeout=DEADLINE_MS)
    page.click("button[name=verify]")
    assert page.locator(".verdict").get_attribute("data-ok") == "true"
    with page.expect_download() as download:
        page.click("button[name=export-jsonl]")
    exported = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert newest["request_id"] in {r["request_id"] for r in exported}
    assert all(r["model"] == "echo" or r["served_model"] == "echo" for r in exported)
    shots(page, "audit")


def test_models_show_state_numbers_and_admin_actions(page: Page, shots: Callable[[Page, str], Path]) -> None:
    go(page, "models")
    for name in ("echo", "agent", "minilm"):
        page.wait_for_selector(f"tr[data-model={name}][data-state=ready]")
    echo = page.locator("tr[data-model=echo]")
    assert "2048" in echo.inner_text() and "fake" in echo.inner_text()
    expect(echo.locator("td").nth(8)).not_to_have_text("–", timeout=DEADLINE_MS)
    assert float(echo.locator("td").nth(8).inner_text()) > 0  # TTFT in ms
    assert "tools" in page.locator("tr[data-model=agent]").inner_text()
    assert "embeddings" in page.locator("tr[data-model=minilm]").inner_text()
    page.click("button[name=reload]")
    assert '"object": "reload"' in page.locator("pre.result").inner_text()
    shots(page, "models")


def test_swap_canary_and_rollback_from_the_models_page(page: Page) -> None:
    echo = page.locator("tr[data-model=echo]")
    before = echo.locator("td").nth(3).inner_text()
    echo.locator("input[name=version]").fill("v2")
    echo.locator("button[name=swap]").click()
    expect(page.locator("pre.result")).to_contain_text('"outcome": "swapped"', timeout=DEADLINE_MS)
    page.wait_for_selector("tr[data-model=echo] >> text=v2")
    echo.locator("input[name=version]").fill("v3")
    echo.locator("input[name=canary]").fill("50")
    echo.locator("input[name=canary_window_s]").fill("1")
    echo.locator("button[name=swap]").click()  # no traffic in its window: the canary is rolled back
    expect(page.locator("pre.result")).to_contain_text('"outcome": "rolled_back"', timeout=DEADLINE_MS)
    assert "v2" in echo.locator("td").nth(3).inner_text()
    echo.locator("button[name=rollback]").click()
    expect(echo.locator("td").nth(3)).to_have_text(before, timeout=DEADLINE_MS)


def test_opening_the_page_on_a_keyed_server_makes_no_refused_call(browser: Browser, server: ServerProcess) -> None:
    """Before a key is pasted the page asks its own server.json whether keys are on, not an API route without
    a key (that left a 401 row in the audit log at every page load)."""
    context = new_context(browser, server)
    page = context.new_page()
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((r.url, r.status)))
    page.goto(server.url + "/console/")
    expect(page.locator("input[name=key]")).to_be_visible(timeout=DEADLINE_MS)
    page.wait_for_load_state("networkidle")
    context.close()
    assert (server.url + "/console/server.json", 200) in answers
    assert [a for a in answers if a[1] >= 400] == []


def test_an_application_key_sees_no_admin_page(browser: Browser, server: ServerProcess, requested: list[str]) -> None:
    with admin_client(server) as admin:
        secret = new_key(admin, models=["echo"])["secret"]
    context = new_context(browser, server)
    page = context.new_page()
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.url + "/console/#/keys")
    page.fill("input[name=key]", secret)
    page.click("button[name=use-key]")
    page.wait_for_selector("button[name=forget]")
    assert page.locator(".pill.admin").count() == 0
    expect(page.locator("main")).to_have_text("This page needs an admin key.", timeout=DEADLINE_MS)
    go(page, "playground")
    expect(page.locator("select[name=model] option")).to_have_text(["echo"], timeout=DEADLINE_MS)
    page.click("button[name=forget]")
    expect(page.locator("input[name=key]")).to_be_visible(timeout=DEADLINE_MS)
    assert page.evaluate("sessionStorage.getItem('inhouse.console.key')") is None
    context.close()


def test_connect_dify_gives_each_models_form_values(page: Page, server: ServerProcess,
                                                   shots: Callable[[Page, str], Path]) -> None:
    go(page, "dify")

    def field(model: str, kind: str, label: str) -> str:
        form = page.locator(f".dify-form[data-model={model}][data-type='{kind}']")
        return form.locator(f"tr[data-field='{label}'] code").inner_text()

    assert field("echo", "LLM", "Model context size") == "2048"
    assert field("echo", "LLM", "Function calling") == "Not Support"
    assert field("agent", "LLM", "Function calling") == "Tool Call"
    assert field("agent", "LLM", "Stream function calling") == "Support"
    assert field("minilm", "Text Embedding", "Model Name") == "minilm"
    assert field("minilm", "Rerank", "API endpoint URL") == server.url + "/v1"
    url = page.locator(".dify-form[data-model=echo][data-type=LLM] tr[data-field='API endpoint URL'] button.copy")
    assert copied(page, url) == server.url + "/v1"
    name = page.locator(".dify-form[data-model=agent][data-type=LLM] tr[data-field='Model Name'] button.copy")
    assert copied(page, name) == "agent"
    assert page.locator(".pitfalls li").count() >= 8
    shots(page, "dify")


def test_chinese_from_the_browser_language_and_the_toggle(browser: Browser, server: ServerProcess,
                                                          requested: list[str],
                                                          shots: Callable[[Page, str], Path]) -> None:
    context = new_context(browser, server, locale="zh-CN")
    page = context.new_page()
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.url + "/console/#/dify")
    expect(page.locator("a[data-page=playground]")).to_have_text("调试台", timeout=DEADLINE_MS)
    page.fill("input[name=key]", ADMIN_KEY)
    page.click("button[name=use-key]")
    page.wait_for_selector(".dify-form")
    assert "模型上下文长度" in page.locator(".dify-form").first.inner_text()
    shots(page, "zh-dify")
    page.click("button[name=language]")
    expect(page.locator("a[data-page=playground]")).to_have_text("Playground", timeout=DEADLINE_MS)
    page.reload()  # the choice is kept for the tab
    expect(page.locator("a[data-page=playground]")).to_have_text("Playground", timeout=DEADLINE_MS)
    context.close()


def test_the_page_asks_nothing_of_any_other_origin(requested: list[str], server: ServerProcess) -> None:
    assert requested, "no request was seen"
    outside = [u for u in requested if not u.startswith(server.url + "/") and not u.startswith(("data:", "blob:"))]
    assert outside == []


def test_a_server_without_keys_needs_none_in_the_console(browser: Browser, tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "open.yaml").write_text("models:\n  - {name: lab, path: unused, engine: fake, fake_reply: hi there}\n",
                                        encoding="utf-8")
    with ServerProcess(["--config", str(tmp_path / "open.yaml")], cache_dir, tmp_path / "open.log") as server:
        context = new_context(browser, server)
        page = context.new_page()
        page.goto(server.url + "/console/")
        page.wait_for_selector(".keybar[data-open=true]")
        assert page.locator("input[name=key]").count() == 0
        page.fill("textarea[name=prompt]", "hello")
        page.click("button[name=send]")
        expect(page.locator(".msg.assistant[data-state=done] .content")).to_have_text("hi there", timeout=DEADLINE_MS)
        go(page, "keys")
        expect(page.locator("main")).to_contain_text("auth: none", timeout=DEADLINE_MS)
        context.close()
