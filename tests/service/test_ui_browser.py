"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) against a running `hcnr serve` (API + embedded worker, SQLite).

Logs in with the keyboard, uploads a file, creates an `auto` job on the toy from the form
(two more files uploaded by the form itself), watches it finish through server-sent
events, checks that the page's tables equal the job's report and artifacts as the API
serves them, cancels a running job with the keyboard, estimates a job from the form (the API's
numbers, nothing created), sets and deletes a secret on the settings page, and checks
that another tenant gets 404. Screenshots of each page are saved and checked for their
key elements (the PNG's size and colours, and the pixels of the charts' elements)."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service import service_procs as procs
from tests.service import ui_support as ui
from tests.service.service_support import Models

selenium = pytest.importorskip("selenium", reason="selenium is in the test extras")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="chromium and chromium-driver are not installed (scripts/install-services.sh)",
    ),
]
AUTO = {
    "candidates": [
        {"name": "paper"},
        {"name": "exact", "hyperparameters": {"compensation": "exact"}},
    ],
    "max_domain_drop": 100.0,
    "require_improvement": False,  # the toy never refuses: nothing could improve
    "max_new_tokens": 4,
}
SLOW = "uislow"  # worker/faults.py: every progress event of a job labelled uislow=yes sleeps


@dataclass
class Server:
    url: str
    keys: dict[str, str]
    log: Path

    def api(self, tenant: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("ui-browser")
    env = procs.service_env(env="test", data_dir=data_dir, models_root=models.root)
    env["HCNR_FAULT_INJECTION"] = f"slow_on_label={SLOW}:yes:0.3"
    keys = {tenant: procs.create_key(env, tenant) for tenant in ("alice", "bob")}
    process, url = procs.start_api(env, data_dir / "serve.log")
    yield Server(url, keys, data_dir / "serve.log")
    procs.stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1600"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Screenshots land here, or in $HCNR_UI_SCREENSHOTS to keep them."""
    keep = os.environ.get("HCNR_UI_SCREENSHOTS")
    out = Path(keep) if keep else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def screenshot(driver: webdriver.Chrome, shots: Path, name: str) -> Path:
    """A full-page screenshot, checked to be a real rendering (not blank, not tiny)."""
    from PIL import Image

    driver.set_window_size(1280, 800)  # then as tall as this page
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(800, min(int(height) + 40, 6000)))
    path = shots / f"{name}.png"
    assert driver.save_screenshot(str(path))
    image = Image.open(path).convert("RGB")
    assert image.width >= 1000 and image.height >= 600, image.size
    colours = image.getcolors(1 << 24)
    assert len(colours) > 40, f"{name}: {len(colours)} colours: a blank page?"
    white = max(count for count, rgb in colours if rgb == (255, 255, 255))
    assert white < 0.97 * image.width * image.height, f"{name}: almost all white"
    return path


def has_colour(element: WebElement, rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
    """Whether the element's own screenshot has pixels of this colour."""
    from PIL import Image

    image = Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")
    return any(
        all(abs(a - b) <= tolerance for a, b in zip(pixel, rgb, strict=True))
        for _, pixel in image.getcolors(1 << 24)
    )


def wait(driver: webdriver.Chrome, condition, timeout: float = 60, what: str = ""):
    """Until `condition(driver)` is truthy; pages reloading meanwhile are retried."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException

    try:
        return WebDriverWait(
            driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
        ).until(lambda d: condition(d))
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text[:1500]
        pytest.fail(f"waiting for {what or 'the page'} at {driver.current_url}:\n{body}")


def unlabelled_fields(driver: webdriver.Chrome) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => e.type !== 'hidden' && e.labels.length === 0).map(e => e.name);"
    )


def test_dashboard_in_a_browser(server: Server, browser: webdriver.Chrome, models, shots, tmp_path):
    driver, url, key = browser, server.url, server.keys["alice"]
    visited: list[str] = []

    def go(path: str) -> None:
        driver.get(url + path)
        visited.append(driver.current_url)

    # --- log in with the keyboard (the field has focus) -------------------------------------
    go("/ui/jobs")
    assert driver.current_url == url + "/ui/login"
    assert driver.switch_to.active_element.get_attribute("id") == "api_key"
    screenshot(driver, shots, "01-login")
    driver.switch_to.active_element.send_keys(key + Keys.ENTER)
    wait(driver, lambda d: d.current_url == url + "/ui/jobs", what="the jobs page")
    visited.append(driver.current_url)
    assert driver.find_element(By.ID, "tenant-name").text == "alice"
    assert key not in driver.execute_script("return document.cookie")  # HttpOnly

    # --- upload a file from the page ---------------------------------------------------------
    go("/ui/files/new")
    assert unlabelled_fields(driver) == []
    driver.find_element(By.ID, "upload-file").send_keys(str(models.honesty))
    driver.find_element(By.ID, "upload-submit").click()
    honesty_id = wait(driver, lambda d: d.find_element(By.ID, "uploaded-id").text)
    screenshot(driver, shots, "02-upload")
    with server.api("alice") as api:
        assert api.get(f"/v1/files/{honesty_id}").json()["samples"] == len(
            models.honesty.read_text().splitlines()
        )

    # --- create an auto job from the form: one file by id, two uploaded by the form ------------
    eval_path = tmp_path / "eval.jsonl"
    tasks = [json.loads(line) for line in models.task.read_text().splitlines()]
    rows = [
        *(json.loads(line) for line in models.honesty.read_text().splitlines()),
        *({**t, "answers": [t["response"].rstrip(" .")]} for t in tasks),
    ]
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    go("/ui/jobs/new")
    assert unlabelled_fields(driver) == []
    driver.find_element(By.CSS_SELECTOR, "#job-method option[value=auto]").click()
    driver.find_element(By.ID, "job-base").send_keys("path:base")
    driver.find_element(By.ID, "job-finetuned").send_keys("path:finetuned-adapter")
    driver.find_element(By.ID, "job-honesty-file").send_keys(honesty_id)
    driver.find_element(By.ID, "job-task-upload").send_keys(str(models.task))
    driver.find_element(By.ID, "job-eval-upload").send_keys(str(eval_path))
    hyper = driver.find_element(By.ID, "job-hyperparameters")
    hyper.clear()
    hyper.send_keys(json.dumps(AUTO))
    driver.find_element(By.ID, "job-metadata").send_keys("run=browser")
    screenshot(driver, shots, "03-new-job")
    driver.find_element(By.ID, "job-submit").click()
    wait(driver, lambda d: "/ui/jobs/job_" in d.current_url, what="the job page")
    visited.append(driver.current_url)
    job_id = driver.find_element(By.ID, "job-id").text

    # --- watch it finish: live updates without a reload, then the results --------------------
    driver.execute_script("window.hcnrMarker = 1")  # gone once the page reloads
    # Marker, status and percent read in one script: all from the same document (reading
    # them one by one could see the reloaded page's values while the marker looked set).
    read = (
        "return [window.hcnrMarker === 1, document.getElementById('job-status').textContent,"
        " document.getElementById('job-percent').textContent];"
    )
    same_page, *values = driver.execute_script(read)
    first = tuple(values)
    assert same_page and first[0] in ("validating", "queued", "running"), first
    live: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        same_page, *values = driver.execute_script(read)
        if not same_page:
            break  # the stream said `end` and the page reloaded
        live.add(tuple(values))
        time.sleep(0.1)
    assert live - {first}, f"no live update on the page: {live}"
    wait(driver, lambda d: d.find_element(By.ID, "job-status").text == "succeeded", 60)
    with server.api("alice") as api:
        job = api.get(f"/v1/repair-jobs/{job_id}").json()
        report = api.get(f"/v1/repair-jobs/{job_id}/report").json()
        artifacts = api.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]
        chosen = api.get(f"/v1/repair-jobs/{job_id}/artifacts/{report['chosen_report']}").json()
    assert job["status"] == "succeeded" and job["metadata"] == {"run": "browser"}
    page = ui.parse(driver.page_source)
    assert ui.honesty_values(page) == ui.expected_honesty(job["metrics"])
    assert ui.page_cells(page) == ui.expected_cells(chosen)
    assert ui.page_fractions(page) == ui.expected_fractions(chosen)  # shaded by share
    assert driver.find_element(By.ID, "auto-chosen").text == report["chosen"]
    candidates = [
        e.get_attribute("data-candidate")
        for e in driver.find_elements(By.CSS_SELECTOR, "#candidates-table tr[data-candidate]")
    ]
    assert candidates == [c["name"] for c in report["candidates"]]
    rows = driver.find_elements(By.CSS_SELECTOR, "#artifacts-table tr[data-artifact]")
    shown = {
        r.get_attribute("data-artifact"): r.find_element(By.CSS_SELECTOR, "code.sha").text
        for r in rows
    }
    assert shown == {a["name"]: a["sha256"] for a in artifacts}
    # A download link works in the browser (cookie, no header) and gives the listed bytes.
    digest = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer())"
        ".then(b => crypto.subtle.digest('SHA-256', b))"
        ".then(d => done([...new Uint8Array(d)]"
        ".map(x => x.toString(16).padStart(2, '0')).join('')));",
        f"/ui/jobs/{job_id}/artifacts/config.json",
    )
    assert digest == shown["config.json"]
    # The screenshot shows the key elements: the charts' own pixels are drawn.
    screenshot(driver, shots, "04-job-succeeded")
    heatmap = driver.find_element(By.CSS_SELECTOR, "#selected svg.heatmap")
    assert heatmap.is_displayed() and has_colour(heatmap, (8, 48, 107))  # the fullest cell
    frontier = driver.find_element(By.CSS_SELECTOR, "#frontier svg.frontier")
    assert frontier.is_displayed() and has_colour(frontier, (26, 152, 80))  # within the limit
    timings = driver.find_element(By.CSS_SELECTOR, "#timings svg.stages")
    assert has_colour(timings, (27, 111, 181))
    assert has_colour(driver.find_element(By.ID, "job-status"), (230, 244, 234))
    assert driver.find_elements(By.ID, "cancel") == []

    # --- the list: filters, and live status of a running job -----------------------------------
    go("/ui/jobs?metadata=run%3Dbrowser")
    rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-job-id]")
    assert [r.get_attribute("data-job-id") for r in rows] == [job_id]
    go("/ui/jobs?status=failed")
    assert driver.find_elements(By.CSS_SELECTOR, "tr[data-job-id]") == []
    with server.api("alice") as api:
        files = {
            p: api.post("/v1/files", files={"file": path.read_bytes()}, data={"purpose": p}).json()[
                "id"
            ]
            for p, path in (("honesty", models.honesty), ("task", models.task))
        }
        slow = api.post("/v1/repair-jobs", json={
            "method": "hcnr", "base": "path:base", "finetuned": "path:finetuned-adapter",
            "honesty_file": files["honesty"], "task_file": files["task"],
            "metadata": {SLOW: "yes"},
        }).json()["id"]  # fmt: skip
    go("/ui/jobs")
    driver.execute_script("window.hcnrMarker = 1")
    status = f'tr[data-job-id="{slow}"] [data-field="status"]'
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, status).text == "running", 120,
         "the running job's row")  # fmt: skip
    assert driver.execute_script("return window.hcnrMarker === 1")  # updated in place
    screenshot(driver, shots, "05-jobs-live")

    # --- cancel it from its page with the keyboard --------------------------------------------
    go(f"/ui/jobs/{slow}")
    button = driver.find_element(By.ID, "cancel")
    assert button.tag_name == "button"
    driver.execute_script("arguments[0].focus()", button)
    assert driver.switch_to.active_element == button
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait(driver, lambda d: d.find_element(By.ID, "job-status").text == "cancelled", 120,
         "the cancelled job")  # fmt: skip
    screenshot(driver, shots, "06-job-cancelled")
    with server.api("alice") as api:
        assert api.get(f"/v1/repair-jobs/{slow}").json()["status"] == "cancelled"

    # --- estimate a job from the form, with the keyboard: the API's numbers, nothing created ---
    go("/ui/jobs/new")
    driver.find_element(By.ID, "job-base").send_keys("path:base")
    driver.find_element(By.ID, "job-finetuned").send_keys("path:finetuned-adapter")
    driver.find_element(By.ID, "job-honesty-file").send_keys(files["honesty"])
    driver.find_element(By.ID, "job-task-file").send_keys(files["task"])
    button = driver.find_element(By.ID, "job-estimate")
    driver.execute_script("arguments[0].focus()", button)
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait(driver, lambda d: d.find_elements(By.ID, "estimate"), what="the estimate")
    with server.api("alice") as api:
        # no method on either side: the form's default is the API's (auto)
        body = {"base": "path:base", "finetuned": "path:finetuned-adapter",
                "honesty_file": files["honesty"], "task_file": files["task"]}  # fmt: skip
        estimate = api.post("/v1/repair-jobs/estimate", json=body).json()
        n_jobs = len(api.get("/v1/repair-jobs", params={"limit": 100}).json()["data"])
    shown = driver.find_element(By.ID, "est-parameters").get_attribute("data-value")
    assert int(shown) == estimate["parameters"]
    host = driver.find_element(By.CSS_SELECTOR, '#estimate-memory tr[data-mode="whole"] td')
    assert float(host.get_attribute("data-value")) == estimate["memory_whole"]["host_gib"]
    assert n_jobs == 2  # the auto job and the cancelled one: the estimate created none
    screenshot(driver, shots, "07-estimate")

    # --- settings: a secret set with the keyboard, listed by name only, deleted ---------------
    go("/ui/settings")
    assert unlabelled_fields(driver) == []
    driver.find_element(By.CSS_SELECTOR, "#secret-name option[value=mlflow_token]").click()
    value = "mlflow-token-typed-in-the-browser"
    driver.find_element(By.ID, "secret-value").send_keys(value + Keys.ENTER)
    wait(driver, lambda d: d.find_elements(By.ID, "secret-saved"), what="the saved secret")
    assert driver.find_elements(By.CSS_SELECTOR, 'tr[data-secret="mlflow_token"]')
    assert value not in driver.page_source
    screenshot(driver, shots, "08-settings")
    with server.api("alice") as api:
        assert [s["name"] for s in api.get("/v1/secrets").json()["data"]] == ["mlflow_token"]
    driver.find_element(By.ID, "delete-mlflow_token").click()
    wait(driver, lambda d: d.find_elements(By.ID, "secret-deleted"), what="the deleted secret")
    with server.api("alice") as api:
        assert api.get("/v1/secrets").json()["data"] == []

    # --- another tenant: 404 on alice's job, not in his list -----------------------------------
    driver.delete_all_cookies()
    go("/ui/login")
    driver.find_element(By.ID, "api_key").send_keys(server.keys["bob"] + Keys.ENTER)
    wait(driver, lambda d: d.current_url == url + "/ui/jobs", what="bob's jobs page")
    assert driver.find_elements(By.CSS_SELECTOR, "tr[data-job-id]") == []
    go(f"/ui/jobs/{job_id}")
    assert driver.find_element(By.ID, "error-message").get_attribute("data-code") == "not_found"
    screenshot(driver, shots, "09-other-tenant-404")

    # The key is in no URL the browser visited and in nothing the server logged.
    assert not [u for u in visited if key in u or server.keys["bob"] in u]
    logged = server.log.read_text(errors="replace")
    assert "/ui/jobs/" + job_id in logged  # the log is the access log we think it is
    assert key not in logged and server.keys["bob"] not in logged
    assert sorted(p.name for p in shots.glob("0*.png")) == [
        "01-login.png", "02-upload.png", "03-new-job.png", "04-job-succeeded.png",
        "05-jobs-live.png", "06-job-cancelled.png", "07-estimate.png", "08-settings.png",
        "09-other-tenant-404.png",
    ]  # fmt: skip
