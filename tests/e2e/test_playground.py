"""The browser playground at `/`, driven in real headless Chromium (Selenium) against the real stack:
an image file and a prompt give the same streamed answer the API gives, a second turn continues the
conversation, and an OpenAI error is shown with its field. The screenshot lands in test-artifacts/
(and in docs/playground.png, shown by the README, with MMSERVE_UPDATE_SCREENSHOT=1)."""

from __future__ import annotations

import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import ROOT, make_image, openai_client

MAX_TOKENS = 12
WAIT_S = 120


def chromium() -> webdriver.Chrome:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "Debian's chromium and chromium-driver are needed (make install-browser)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def answers(browser) -> list[str]:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done] .text")]


def test_playground_streams_an_answer_about_an_image_and_continues(served, browser, tmp_path):
    stack, _ = served
    image = tmp_path / "cat.png"
    image.write_bytes(make_image(64, 48, seed=7))
    browser.get(stack.base_url + "/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "model: "))
    model = browser.find_element(By.ID, "model").text.removeprefix("model: ")

    browser.find_element(By.ID, "image-file").send_keys(str(image))
    wait.until(
        lambda b: b.find_element(By.ID, "image-preview").get_attribute("src").startswith("data:image/png")
    )
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys(str(MAX_TOKENS))
    browser.find_element(By.ID, "prompt").send_keys("What is in the image?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: len(answers(b)) == 1)

    # The page sent what a client would: the same request through the API gives the same greedy text.
    data_url = browser.find_element(By.CSS_SELECTOR, ".turn.user img").get_attribute("src")
    first_turn = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "What is in the image?"},
        ],
    }
    client = openai_client(stack)
    expected = client.chat.completions.create(
        model=model, messages=[first_turn], max_tokens=MAX_TOKENS, temperature=0
    )
    assert answers(browser) == [expected.choices[0].message.content]
    stats = browser.find_element(By.ID, "stats").text
    assert "TTFT" in stats and f"{expected.usage.completion_tokens} completion tokens" in stats

    browser.find_element(By.ID, "prompt").send_keys("And what colour is it?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: len(answers(b)) == 2)
    second = client.chat.completions.create(
        model=model,
        messages=[
            first_turn,
            {"role": "assistant", "content": expected.choices[0].message.content},
            {"role": "user", "content": "And what colour is it?"},
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert answers(browser)[1] == second.choices[0].message.content
    save_screenshot(browser)


def test_playground_shows_an_openai_error_with_its_field(served, browser):
    stack, _ = served
    browser.get(stack.base_url + "/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "model: "))
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("100000000")
    browser.find_element(By.ID, "prompt").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("HTTP 400 invalid_request_error"), error
    assert "max_tokens" in error, error
    assert answers(browser) == []


def save_screenshot(browser) -> None:
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    browser.save_screenshot(str(ROOT / "test-artifacts" / "playground.png"))
    if os.environ.get("MMSERVE_UPDATE_SCREENSHOT"):
        browser.save_screenshot(str(ROOT / "docs" / "playground.png"))
