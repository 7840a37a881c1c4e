"""The web inspector in a real browser: Playwright driving Debian's chromium (headless, as
root in CI), against the inspector over a real SDK client of the in-process server.

PARAMHUB_UI_SCREENSHOTS=docs saves a screenshot of each page there (the README shows them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from _ui import make_model, served_ui

CHROMIUM = os.environ.get("PARAMHUB_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason=f"no chromium at {CHROMIUM} (.ci/run installs it)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
#: How long an expectation may wait for the page (a bound, not a timing assertion: the
#: machine running the tests may be busy).
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1100, "height": 320})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield pg
    context.close()
    # No script error and no CSP violation on any page the test visited.
    assert not [e for e in errors if "403" not in e and "409" not in e], errors


@pytest.fixture
def ui(client):
    make_model(client)
    with served_ui(client, allow_edits=True, role="admin") as (_, base):
        yield base


def shot(page, name: str) -> None:
    out = os.environ.get("PARAMHUB_UI_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=True)


def test_browser_tree_then_parameter_follows_writes_live(ui, page, client):
    from playwright.sync_api import expect

    page.goto(ui + "/")
    expect(page.locator('tr[data-model="mlp"] .model-version')).to_have_text("0")
    expect(page.locator("#live")).to_have_class("live on")
    client.set_slice("mlp", "6.bias", None, 0.0)  # a write: the index page follows it
    expect(page.locator('tr[data-model="mlp"] .model-version')).to_have_text("1")
    shot(page, "ui-index.png")

    page.get_by_role("link", name="mlp", exact=True).click()
    tree = page.locator("#tree")
    expect(tree).to_contain_text("(4): Linear(…) shared → 2")
    expect(tree).to_contain_text("tied → 0.weight")
    expect(tree.locator(".mark.eval")).to_have_count(1)  # only BatchNorm1d is in eval mode
    expect(tree.locator(".mark.train")).to_have_count(1)  # the root
    expect(page.locator("#live")).to_have_class("live on")
    client.set_slice("mlp", "2.bias", None, 0.5)
    expect(page.locator("#model-version")).to_have_text("2")
    expect(tree.locator('.tv[data-first="2.bias"]').first).to_have_text("1")

    tree.locator('a.tname[href="/models/mlp/parameters/0.weight"]').click()
    expect(page.locator("h1")).to_have_text("mlp · 0.weight")
    expect(page.locator("#live")).to_have_class("live on")
    expect(page.locator("#values tbody tr")).to_have_count(8)
    client.set_slice("mlp", "0.weight", None, 2.0)
    expect(page.locator("#tensor-version")).to_have_text("1")
    expect(page.locator("#model-version")).to_have_text("3")
    expect(page.locator('[data-stat="max"]')).to_have_text("2")
    expect(page.locator('[data-stat="std"]')).to_have_text("0")
    expect(page.locator("#values tbody tr").first.locator("td").first).to_have_text("2")
    # A few "optimizer steps": the ridge plot collects their histograms.
    g = torch.Generator().manual_seed(0)
    for step in range(2, 8):
        client.set_slice("mlp", "0.weight", None, torch.randn(8, 8, generator=g) / step)
        expect(page.locator("#tensor-version")).to_have_text(str(step))
    expect(page.locator("#ridge-range")).to_have_text("8 versions")
    expect(page.locator("#region-info")).to_contain_text("at version 7")  # heat map, table
    shot(page, "ui-tensor.png")


def test_browser_edit_in_the_page_reads_back_through_the_sdk(ui, page, client):
    from playwright.sync_api import expect

    page.goto(ui + "/models/mlp/parameters/2.weight")
    expect(page.locator("#live")).to_have_class("live on")
    page.fill("#set-index", "0, 0:3")
    page.fill("#set-value", "42")
    page.click("#set-submit")
    expect(page.locator("#edit-result")).to_have_class("result ok")
    t, version = client.get_tensor("mlp", "2.weight")
    assert version == 1
    assert t[0, :3].tolist() == [42.0, 42.0, 42.0] and (t[1:] != 42).all()
    assert torch.equal(client.get_tensor("mlp", "4.weight")[0], t)  # the shared module
    expect(page.locator("#tensor-version")).to_have_text("1")
    expect(page.locator('[data-stat="max"]')).to_have_text("42")

    # An init from the page, at the model version the page shows.
    page.select_option("#init-scheme", "zeros_")
    page.click("#init-submit")
    expect(page.locator("#edit-result")).to_have_class("result ok")
    assert (client.get_tensor("mlp", "2.weight")[0] == 0).all()
    expect(page.locator('[data-stat="norm"]')).to_have_text("0")

    # A checkpoint from the model page.
    page.goto(ui + "/models/mlp")
    page.fill("#checkpoint-name", "zeroed")
    page.click("#checkpoint-form button")
    expect(page.locator("#edit-result")).to_have_class("result ok")
    expect(page.locator("#checkpoints")).to_contain_text("zeroed")
    assert [c.name for c in client.list_checkpoints("mlp")] == ["zeroed"]
    shot(page, "ui-model.png")


def test_browser_stale_edit_is_refused_and_shown(ui, page, client):
    from playwright.sync_api import expect

    page.goto(ui + "/models/mlp/parameters/0.bias")
    expect(page.locator("#live")).to_have_class("live on")
    expect(page.locator("#tensor-version")).to_have_text("0")
    page.uncheck("#follow")  # the view stays at version 0 ...
    client.set_slice("mlp", "0.bias", None, 1.0)  # ... while someone else writes
    before, v = client.get_tensor("mlp", "0.bias")
    assert v == 1
    page.wait_for_timeout(300)  # give a (wrong) live update the chance to arrive
    expect(page.locator("#tensor-version")).to_have_text("0")
    page.fill("#set-value", "5")
    page.click("#set-submit")
    result = page.locator("#edit-result")
    expect(result).to_have_class("result stale")
    expect(result).to_contain_text("VERSION_MISMATCH")
    after, v2 = client.get_tensor("mlp", "0.bias")
    assert v2 == 1 and torch.equal(after, before)
    # The refusal turns following back on: the page catches up with the server.
    expect(page.locator("#tensor-version")).to_have_text("1")
    expect(page.locator("#region-info")).to_contain_text("at version 1")
    shot(page, "ui-stale.png")


def test_browser_post_without_csrf_token_is_refused(ui, page, client):
    page.goto(ui + "/models/mlp/parameters/0.bias")
    status = page.evaluate("""async () => {
        const r = await fetch('/api/models/mlp/set_slice', {method: 'POST',
            headers: {'content-type': 'application/json'},
            body: JSON.stringify({name: '0.bias', value: '9', expected_version: 0})});
        return [r.status, (await r.json()).reason];
    }""")
    assert status == [403, "CSRF_TOKEN"]
    assert client.tensor_version("mlp", "0.bias") == 0
