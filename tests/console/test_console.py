"""The web console, driven in a real browser (Debian's chromium through Playwright) against a real
`plait serve`: keys, an adapter uploaded through the page, a compare-mode chat streamed side by side,
a fine-tuning job trained to the end with its loss chart, the adapter deleted. Each test saves a
screenshot in $PLAIT_SCREENSHOTS (by default `plait-console-shots` in the system's temporary
folder); the README's two in docs/console/ are copies of those. The browser must start: a test
whose browser cannot fails."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

API_KEY, ADMIN_KEY = "console-user", "console-admin"
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("PLAIT_SCREENSHOTS") or Path(tempfile.gettempdir()) / "plait-console-shots")
ADAPTER = "console-adapter"


@pytest.fixture(scope="module")
def console_server(launch_module_server):
    return launch_module_server(
        "--api-key",
        API_KEY,
        "--admin-key",
        ADMIN_KEY,
        "--threads",
        "1",
        "--train-threads",
        "1",
        "--train-dtype",
        "float32",
    )


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def open_console(browser, console_server):
    """`open_console(key)`: a page on the console with `key` already in its session storage (None: no key).
    JavaScript errors on the page fail the test."""
    contexts, errors = [], []

    def make(key: str | None = ADMIN_KEY, hash: str = "") -> Page:
        context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=console_server.base_url)
        if key is not None:
            context.add_init_script(f"sessionStorage.setItem('plait.key', {json.dumps(key)})")
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())
        page.goto("/" + hash)
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, errors


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_console_is_served_without_shadowing_the_api(console_server):
    with console_server.http() as http:
        page = http.get("/")
        assert page.status_code == 200 and "console.js" in page.text
        assert http.get("/console/console.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/console/").status_code == 200
        assert http.get("/console/nope.js").json()["error"]["type"] == "not_found_error"
        assert http.get("/v1/models").status_code == 401  # the API's routes and checks are untouched
        assert http.get("/health").json()["status"] == "ok"
        assert "plait_requests_running" in http.get("/metrics").text
        assert not any(p == "/" or p.startswith("/console") for p in http.get("/openapi.json").json()["paths"])


def test_a_wrong_key_shows_the_api_error_and_the_server_refuses_what_the_key_may_not_do(
    open_console, console_server, tmp_path, random_adapter
):
    page = open_console(key=None)
    expect(page.locator("#key-panel")).to_be_visible()
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_have_text(
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'."
    )
    shot(page, "key")

    # The API key reads but may not change adapters: the page says so and disables the forms...
    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#key-status")).to_contain_text("read-only")
    expect(page.locator("#upload-form button[type=submit]")).to_be_disabled()
    expect(page.locator("#base-table")).to_contain_text(console_server.model)
    shot(page, "read-only")

    # ...and the server, not the page, enforces it: the upload the page would send is refused.
    folder = random_adapter(tmp_path / "a", seed=1)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {}):
        answer = httpx.post(f"{console_server.base_url}/v1/adapters", data={"id": "x"}, files=files, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["message"].startswith("Incorrect or missing admin key")
    assert (
        httpx.get(
            f"{console_server.base_url}/v1/adapters/x", headers={"Authorization": f"Bearer {API_KEY}"}
        ).status_code
        == 404
    )


def test_upload_an_adapter_through_the_page(open_console, console_server, tmp_path, random_adapter):
    page = open_console()
    expect(page.locator("#key-status")).to_contain_text("admin")
    folder = random_adapter(tmp_path / "adapter", seed=7)
    page.fill("#upload-id", ADAPTER)
    page.set_input_files(
        "#upload-files", [str(folder / "adapter_config.json"), str(folder / "adapter_model.safetensors")]
    )
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#upload-form .ok")).to_contain_text(f"Uploaded {ADAPTER} (version 1, rank 4)")
    row = page.locator("#adapters-table tr", has_text=ADAPTER)
    expect(row).to_contain_text("q_proj, v_proj")
    # An upload the API refuses shows the API's words.
    page.fill("#upload-id", "broken")
    page.set_input_files("#upload-files", [str(folder / "adapter_config.json")])
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#upload-form .error")).to_be_visible()
    message = page.locator("#upload-form .error").inner_text()
    answer = httpx.post(
        f"{console_server.base_url}/v1/adapters",
        data={"id": "broken"},
        files=[("files", ("adapter_config.json", (folder / "adapter_config.json").read_bytes()))],
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert answer.status_code >= 400 and message == answer.json()["error"]["message"]
    shot(page, "models")


def test_compare_the_adapter_with_the_base_streamed_side_by_side(open_console, console_server):
    page = open_console(hash="#playground")
    page.select_option("#compare", "2")
    selects = page.locator(".model-select")
    expect(selects).to_have_count(2)
    selects.nth(0).select_option(console_server.model)
    selects.nth(1).select_option(ADAPTER)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.check("#logprobs")
    page.fill("#system-prompt", "You are a helpful assistant.")
    page.fill("#chat-input", "Write one sentence about the sea.")
    page.click("#send")
    answers = page.locator(".msg.assistant[data-done]")
    expect(answers).to_have_count(2, timeout=120_000)
    base, adapted = (answers.nth(i).locator(".content").inner_text() for i in range(2))
    assert base.strip() and adapted.strip() and base != adapted
    for i, model in enumerate((console_server.model, ADAPTER)):
        expect(answers.nth(i).locator(".meta")).to_contain_text(f"{model} · ")
    # logprobs on hover: every token is a span whose title holds its logprob and the top ones
    token = page.locator(".pane").nth(1).locator(".tok").first
    assert re.search(r"logprob -?\d+\.\d{3}", token.get_attribute("title"))
    token.hover()
    shot(page, "compare")


def test_a_fine_tuning_job_trains_with_its_loss_chart(open_console, console_server, tmp_path):
    page = open_console(hash="#fine-tuning")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n[]\n')
    page.set_input_files("#training-file", str(bad))
    page.click("#file-form button[type=submit]")
    expect(page.locator("#file-form .error")).to_contain_text("line 2")

    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(8)
    ]
    good = tmp_path / "doubles.jsonl"
    good.write_text("".join(json.dumps(line) + "\n" for line in lines))
    page.set_input_files("#training-file", str(good))
    page.click("#file-form button[type=submit]")
    expect(page.locator("#file-form .ok")).to_contain_text("Stored doubles.jsonl")
    page.fill("#hp-n-epochs", "2")
    page.fill("#hp-batch-size", "4")
    page.fill("#hp-lora-rank", "4")
    page.fill("#job-suffix", "doubles")
    page.click("#create-job")
    page.wait_for_url(re.compile(r"#job/"))
    expect(page.locator("#loss-chart circle.pt.train").first).to_be_attached(timeout=180_000)
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    expect(page.locator("#loss-chart circle.pt.train")).to_have_count(4)  # 8 lines / 4 per step x 2 epochs
    model = page.locator("#fine-tuned-model").inner_text()
    assert model.startswith(f"ft:{console_server.model}:doubles:")
    expect(page.locator("#cancel-job")).to_have_count(0)
    expect(page.locator("#checkpoints-table tbody tr")).to_have_count(2)  # one per epoch
    shot(page, "job")

    page.click("#open-playground")
    expect(page.locator(".model-select").first).to_have_value(model)


def test_live_view_and_deleting_the_adapter(open_console, console_server):
    page = open_console(hash="#live")
    expect(page.locator("#stat-kv")).to_contain_text("%")
    expect(page.locator("#live-adapters-table")).to_contain_text(ADAPTER)
    expect(page.locator("#stat-tps .value")).not_to_have_text("…", timeout=10_000)
    shot(page, "live")

    page.goto("/#models")
    row = page.locator("#adapters-table tr", has_text=ADAPTER)
    expect(row).to_be_visible()
    row.get_by_role("button", name=f"Delete {ADAPTER}").click()
    expect(page.locator("#adapters-table tr", has_text=ADAPTER)).to_have_count(0)
    answer = httpx.get(
        f"{console_server.base_url}/v1/adapters/{ADAPTER}", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert answer.status_code == 404
