"""The memory dashboard in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
which ``make test`` installs as root) driven by Selenium against an ``orion serve`` this module starts.

One server and one browser for the module (a second server, with an API key, for the key's test). Every
wait polls the page or the server for a state, with a deadline; nothing sleeps. The screenshot is saved
under the test's tmp dir, and also to ``$DASHBOARD_SCREENSHOT`` when set
(``scripts/dashboard_screenshot.sh`` writes docs/dashboard.png with it).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from test_serve import Server, _home

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    NO_SELENIUM = ""
except ImportError:
    NO_SELENIUM = "selenium is not installed (pip install -e '.[test]')"

pytestmark = pytest.mark.skipif(
    bool(NO_SELENIUM) or not (CHROMIUM and CHROMEDRIVER),
    reason=NO_SELENIUM or "no chromium and chromedriver here: as root on Debian or Ubuntu 'make test' installs them "
                          "(apt-get install chromium chromium-driver)")

XSS_NAME = "<img src=x onerror=alert(1)>"
KEY = "dashboard-s3cret"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(what: str, check, timeout: float = 15.0):
    """``check()``'s first true answer, polled until ``timeout`` seconds (then the test fails, saying ``what``)."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except StaleElementReferenceException:  # the page re-rendered between finding and reading
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"never saw {what}"


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    home = _home(tmp_path_factory, gemma_q4, "dashboard-home")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, "--allow-paths", env={"ORION_CTX": "2048"})
    yield s
    code = s.stop()
    print("".join(s.lines))
    assert code == 0


@pytest.fixture(scope="module")
def page(server):
    driver = browser()
    driver.get(server.url + "/")
    yield driver
    driver.quit()


def rows(driver) -> dict[str, object]:
    """The models table's rows by the name shown."""
    from selenium.webdriver.common.by import By

    return {r.find_element(By.CSS_SELECTOR, "td.name").text: r
            for r in driver.find_elements(By.CSS_SELECTOR, "#models tbody tr")}


def timeline(driver) -> list[tuple[str, str]]:
    from selenium.webdriver.common.by import By

    return [(li.get_attribute("data-kind"), li.find_element(By.CSS_SELECTOR, ".detail").text)
            for li in driver.find_elements(By.CSS_SELECTOR, "#timeline li")]


def ps(server) -> dict:
    return server.json("GET", "/api/orion/ps")


# ---------------------------------------------------------------- the page


def test_the_page_loads_live_with_no_console_errors(server, page):
    from selenium.webdriver.common.by import By

    from orion_cli.units import format_bytes

    wait_for("the page live", lambda: page.find_element(By.ID, "status").text.startswith("live"))
    assert page.find_element(By.ID, "key-form").is_displayed() is False  # no key on this server
    ram = wait_for("the RAM bar", lambda: page.find_elements(By.CSS_SELECTOR, "#bars .bar-block"))[0]
    doc = ps(server)["machine"]["ram"]
    assert "RAM (" + doc["source"] + ")" in ram.text and format_bytes(doc["limit_bytes"]) in ram.text
    marks = {m.get_attribute("class") for m in ram.find_elements(By.CSS_SELECTOR, ".mark")}
    assert marks == {"mark budget", "mark high", "mark critical"}
    high = ram.find_element(By.CSS_SELECTOR, ".mark.high").value_of_css_property("left")
    width = page.execute_script("return arguments[0].getBoundingClientRect().width", ram.find_element(By.CSS_SELECTOR, ".bar"))
    assert float(high.removesuffix("px")) == pytest.approx(0.75 * width, abs=1.5)
    assert page.find_element(By.ID, "no-models").is_displayed()
    wait_for("the event stream", lambda: page.find_element(By.ID, "stream-state").text == "live")
    assert console_errors(page) == []


def test_a_loaded_model_appears_with_its_memory_figures(server, page):
    """Loaded through the API: the page shows it within seconds, with the numbers of /api/orion/ps
    (the document `orion ps` shows), and the timeline has its loading and loaded events."""
    from selenium.webdriver.common.by import By

    from orion_cli.units import format_bytes

    started = time.monotonic()
    assert server.json("POST", "/api/orion/load", {"model": "gemma3-270m", "keep_alive": "10m"})["loaded"] is True
    row = wait_for("gemma3-270m in the table", lambda: rows(page).get("gemma3-270m"), timeout=5)
    assert time.monotonic() - started < 10
    (m,) = [m for m in ps(server)["models"] if m["name"] == "gemma3-270m"]
    (ram,) = [r for r in m["memory"] if r["device"] == "ram"]
    memory = row.find_element(By.CSS_SELECTOR, "td.memory").text
    assert f"ram: {format_bytes(ram['estimate_bytes'])} / {format_bytes(ram['measured_bytes'])}" in memory
    assert f"({ram['error'] * 100:+.1f} %)" in memory
    cells = {c.get_attribute("class").split()[0]: c.text for c in row.find_elements(By.CSS_SELECTOR, "td")}
    assert cells["kind"] == "llm" and cells["type"] == "Q4_K_M" and cells["pinned"] == "no"
    assert cells["where"].startswith("all layers on the CPU") and cells["queue"] == "0"
    assert cells["unloads"].startswith("in 9 min ") or cells["unloads"] == "in 10 min 0 s"  # the keep-alive's countdown
    events = wait_for("the loaded event", lambda: [e for e in timeline(page) if e[0] == "loaded"])
    assert "gemma3-270m" in events[0][1]
    kinds = [k for k, _ in timeline(page)]
    assert kinds.index("loaded") < kinds.index("loading")  # newest first
    bars = page.find_element(By.ID, "bars").text
    assert f"orion's models {format_bytes(ps(server)['machine']['ram']['orion_bytes'])}" in bars
    assert console_errors(page) == []


def test_a_chat_shows_in_requests_and_tokens_a_second(server, page):
    status, _, _ = server.request("POST", "/v1/chat/completions", {
        "model": "gemma3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200
    (m,) = [m for m in ps(server)["models"] if m["name"] == "gemma3-270m"]
    assert m["requests"] >= 1 and m["last_tok_s"] > 0

    def shown():
        from selenium.webdriver.common.by import By

        row = rows(page)["gemma3-270m"]
        return row.find_element(By.CSS_SELECTOR, "td.speed").text not in ("", "-") and row
    row = wait_for("its speed", shown)
    from selenium.webdriver.common.by import By

    assert int(row.find_element(By.CSS_SELECTOR, "td.requests").text) >= 1


def test_pin_and_unpin_buttons(server, page):
    from selenium.webdriver.common.by import By

    button = rows(page)["gemma3-270m"].find_element(By.CSS_SELECTOR, "button.pin")
    assert button.text == "pin"
    button.click()
    wait_for("pinned in /api/orion/ps", lambda: [m for m in ps(server)["models"] if m["pinned"]])
    wait_for("the pin shown", lambda: rows(page)["gemma3-270m"].find_element(By.CSS_SELECTOR, "td.pinned").text == "yes")
    row = rows(page)["gemma3-270m"]
    assert row.find_element(By.CSS_SELECTOR, "td.unloads").text == "never (pinned)"
    row.find_element(By.CSS_SELECTOR, "button.unpin, button.pin").click()
    wait_for("unpinned", lambda: not any(m["pinned"] for m in ps(server)["models"]))
    assert console_errors(page) == []


def test_the_unload_button_unloads_and_the_timeline_says_so(server, page):
    from selenium.webdriver.common.by import By

    rows(page)["gemma3-270m"].find_element(By.CSS_SELECTOR, "button.unload").click()
    wait_for("gemma3-270m gone from the table", lambda: "gemma3-270m" not in rows(page))
    assert [m["name"] for m in ps(server)["models"]] == []
    unloaded = wait_for("the unloaded event", lambda: [d for k, d in timeline(page) if k == "unloaded"])
    assert unloaded[0] == "gemma3-270m: on request"
    assert page.find_element(By.ID, "action-message").text == "unloaded gemma3-270m"
    assert console_errors(page) == []


def test_the_load_form_loads_a_model_that_is_here_and_an_api_unload_shows(server, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    select = Select(page.find_element(By.ID, "load-select"))
    assert {"gemma3-270m", "minilm"} <= {o.get_attribute("value") for o in select.options}
    select.select_by_value("gemma3-270m")
    page.find_element(By.ID, "load-button").click()
    wait_for("gemma3-270m loaded from the page", lambda: "gemma3-270m" in rows(page), timeout=30)
    assert [m["name"] for m in ps(server)["models"]] == ["gemma3-270m"]
    before = len(timeline(page))
    assert server.json("POST", "/api/orion/unload", {"model": "gemma3-270m"})["unloaded"] is True
    wait_for("gemma3-270m gone after the API's unload", lambda: "gemma3-270m" not in rows(page))
    wait_for("its event", lambda: len(timeline(page)) > before and timeline(page)[0][0] == "unloaded")
    assert console_errors(page) == []


def test_a_keep_alive_expiry_shows_in_the_timeline_and_the_model_goes(server, page):
    assert server.json("POST", "/api/orion/load", {"model": "gemma3-270m", "keep_alive": "1s"})["loaded"] is True
    wait_for("the unload for inactivity", lambda: [d for k, d in timeline(page) if k == "unloaded"
                                                  and d.startswith("gemma3-270m: idle for")], timeout=20)
    wait_for("gemma3-270m gone", lambda: "gemma3-270m" not in rows(page))
    assert "(keep-alive 1 s)" in timeline(page)[0][1]
    assert console_errors(page) == []


def test_a_model_named_like_html_is_shown_as_text(server, page, gemma_q4, tmp_path):
    """A GGUF file named ``<img src=x onerror=alert(1)>.gguf`` (clients may name files: --allow-paths):
    its name, in the table and in the events, is text; no element is made of it, no script runs."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    path = tmp_path / f"{XSS_NAME}.gguf"
    path.symlink_to(gemma_q4)
    assert server.json("POST", "/api/orion/load", {"model": str(path)})["loaded"] is True
    row = wait_for("the model in the table", lambda: rows(page).get(str(path)), timeout=10)
    assert row.find_element(By.CSS_SELECTOR, "td.name").text == str(path)
    wait_for("its loaded event", lambda: any(k == "loaded" and XSS_NAME in d for k, d in timeline(page)))
    assert page.find_elements(By.CSS_SELECTOR, "main img") == []
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert.text
    assert console_errors(page) == []  # an <img src=x> would have asked for /x (a 404 in the console)
    assert server.json("POST", "/api/orion/unload", {"model": str(path)})["unloaded"] is True
    wait_for("it gone", lambda: str(path) not in rows(page))


def test_screenshot(server, page, tmp_path):
    """The page with a model loaded and a few minutes' chart (as many samples as there are): saved as a PNG."""
    from selenium.webdriver.common.by import By

    server.json("POST", "/api/orion/load", {"model": "gemma3-270m"})
    server.json("POST", "/api/orion/load", {"model": "minilm", "embedding": True, "pin": True})
    server.request("POST", "/v1/embeddings", {"model": "minilm", "input": ["a dashboard", "of memory"]})
    wait_for("two models shown", lambda: len(rows(page)) == 2, timeout=30)
    wait_for("a few samples", lambda: len(server.json("GET", "/api/orion/history")["samples"]) >= 3, timeout=30)
    wait_for("the chart's line", lambda: len((page.find_element(By.CSS_SELECTOR, "#charts polyline.orion")
                                               .get_attribute("points") or "").split()) >= 3)
    shot = tmp_path / "dashboard.png"
    assert page.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["DASHBOARD_SCREENSHOT"])
    assert console_errors(page) == []


# ---------------------------------------------------------------- the API key


def test_with_an_api_key_the_page_refuses_without_it(tmp_path, engine_check_cache):
    from selenium.webdriver.common.by import By

    home = tmp_path / "key-home"
    home.mkdir()
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, "--api-key", KEY)
    driver = browser()
    try:
        driver.get(s.url + "/")
        form = wait_for("the key form", lambda: driver.find_element(By.ID, "key-form").is_displayed()
                        and driver.find_element(By.ID, "key-form"))
        assert "requires its API key" in form.text
        assert not driver.find_element(By.ID, "dashboard").is_displayed()
        assert console_errors(driver) == []  # it asked /health, which says a key is needed: no 401 yet

        driver.find_element(By.ID, "key-input").send_keys("not-the-key")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for("the refusal", lambda: "Refused" in driver.find_element(By.ID, "key-message").text)
        assert not driver.find_element(By.ID, "dashboard").is_displayed()
        assert driver.find_element(By.ID, "status").text == "refused"

        driver.find_element(By.ID, "key-input").send_keys(KEY)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for("the page live with the key", lambda: driver.find_element(By.ID, "status").text.startswith("live"))
        wait_for("the event stream with the key", lambda: driver.find_element(By.ID, "stream-state").text == "live")
        assert KEY not in driver.current_url and "key" not in driver.current_url
        # the key went as a header: the server counted the page's authorised calls, none with the key in a URL
        status, _, payload = s.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        text = payload.decode()
        assert status == 200 and 'route="/api/orion/ps",model="-",status="200"' in text
        assert 'route="/api/orion/ps",model="-",status="401"' in text
        assert KEY not in text
    finally:
        driver.quit()
        assert s.stop() == 0

