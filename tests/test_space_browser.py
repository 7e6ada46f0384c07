"""The Space in a real browser: Debian's chromium, headless, driven by Playwright.

Load the page, upload a photo, type two prompts, press Explain, wait for the overlays; the overlays and the
probabilities must be on the page (a screenshot goes to ``artifacts/``). Then a file that is not an image and one
over the size limit must each produce a readable error on the page. Without chromium the test is skipped locally
and fails in CI (``CI=true``), which installs it.
"""

import os
import shutil
from pathlib import Path

import pytest

from tests.space_server import CAT, shared_server

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and shutil.which(CHROMIUM)):
        message = f"{CHROMIUM} is missing (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture()
def page(browser):
    server = shared_server()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url)
    page.wait_for_selector("#explain-button")
    page.wait_for_selector("#model-status :text('heads')")  # the page-load event has set up the controls
    yield page
    context.close()


def test_upload_two_prompts_explain_shows_overlays_and_probabilities(page):
    page.set_input_files("#image input[type=file]", str(CAT))
    page.wait_for_selector("#image img")
    page.fill("#prompts textarea", "a photo of a cat\na photo of a dog")
    page.click("#explain-button")

    overlays = page.locator("#overlays img")
    overlays.nth(1).wait_for(state="visible")
    page.wait_for_function(  # decoded images, not broken links
        "() => [...document.querySelectorAll('#overlays img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert overlays.count() == 2
    captions = page.locator("#overlays").inner_text()
    assert "a photo of a cat ·" in captions and "a photo of a dog ·" in captions
    probabilities = page.locator("#probabilities")
    probabilities.get_by_text("a photo of a dog").first.wait_for()
    assert "%" in probabilities.inner_text() and "a photo of a cat" in probabilities.inner_text()
    assert "cat" in page.locator("#tokens").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space-explain.png"), full_page=True)


def test_an_example_fills_the_inputs_and_explains(page):
    page.locator("table tbody tr").first.click()  # the first example: a held-out scene and its captions
    page.wait_for_function("() => document.querySelector('#prompts textarea').value.includes('purple square')")
    page.wait_for_selector("#image img")
    prompts = page.locator("#prompts textarea").input_value().splitlines()
    page.click("#explain-button")
    page.locator("#overlays img").nth(len(prompts) - 1).wait_for(state="visible")
    assert page.locator("#overlays img").count() == len(prompts) == 3
    assert all(p in page.locator("#probabilities").inner_text() for p in prompts)


def test_a_first_visit_offers_scene_examples_not_photos(page):
    """The default model knows shape scenes only: photographs would all score the same, so none are offered."""
    page.get_by_text("Examples: shape scenes").wait_for()
    assert not page.locator("#photo-examples").is_visible()
    assert "trained on synthetic shape scenes only" in page.locator("#model-status").inner_text()


def test_choosing_a_method_shows_its_options_and_how_to_read_it(page):
    """The option controls come from the registry: each method shows its own, the model's default shows none."""
    assert not page.locator("#option-layer").is_visible() and not page.locator("#option-discard_ratio").is_visible()
    page.locator("#method").get_by_text("Attention rollout").click()
    page.locator("#option-discard_ratio").wait_for(state="visible")
    assert page.locator("#option-head_fusion").is_visible() and not page.locator("#option-layer").is_visible()
    page.locator("#how-to-read").get_by_text("Attention rollout multiplies the attention").wait_for()
    page.locator("#method").get_by_text("Raw attention").click()
    page.locator("#option-layer").wait_for(state="visible")
    assert not page.locator("#option-discard_ratio").is_visible()


def test_a_model_that_cannot_load_says_why_on_the_page(page):
    page.locator("#model input").click()
    page.get_by_role("option", name="clipviz/clip-vit-b-32").click()
    status = page.locator("#model-status")
    status.get_by_text("Could not load the model 'clipviz/clip-vit-b-32'").wait_for()
    assert "Traceback" not in status.inner_text()


def readable_error(page, text: str, screenshot: str) -> str:
    """Wait until an error toast containing ``text`` is fully shown (visible and faded in), screenshot the viewport
    (the toast is fixed to it) and return the toast's message."""
    toast = page.locator("[data-testid=toast-text]", has_text=text).first
    toast.wait_for(state="visible")
    page.wait_for_function(
        "el => Number(getComputedStyle(el.closest('[data-testid=toast-body]') || el).opacity) === 1",
        arg=toast.element_handle(),
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / screenshot))
    return toast.inner_text()


def test_a_file_that_is_not_an_image_shows_a_readable_error(page, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture at all")
    page.set_input_files("#image input[type=file]", str(fake))
    page.fill("#prompts textarea", "a photo of a cat")
    page.click("#explain-button")
    message = readable_error(page, "This file is not a PNG", "space-bad-upload.png")
    assert message.startswith("This file is not a PNG, JPEG, WEBP, GIF or BMP image") and "Please upload" in message


def test_an_oversized_upload_shows_a_readable_error(page, tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * (11 * 1024 * 1024))
    page.set_input_files("#image input[type=file]", str(big))
    message = readable_error(page, "exceed", "space-oversized-upload.png")
    assert "maximum allowed size of 10.0 Mb" in message and "huge.png" in message
