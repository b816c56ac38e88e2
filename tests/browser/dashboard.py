#!/usr/bin/env python3
"""The dashboard in a real browser: Debian's chromium, headless, driven through
its chromedriver by selenium. Run by tests/it/dashboard.rs, which starts the
worker and makes the jobs this looks at:

  --batch ID        a batch of noop jobs, not yet due: once the overview is
                    open this writes --ready-file, the test makes the batch
                    due, and its progress bar must advance, without a reload,
                    while the worker drains it
  --errored ID      an ingest job that failed (its file was missing; the test
                    has written it since): retried from its page, first
                    without the token (refused, and the page says so), then
                    with it; it must complete
  --hostile NAME    the file name of a job that must show as text

Screenshots of each page go to --screenshots DIR. Exits 0 when every check
holds; otherwise prints what failed and exits 1.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='docworker-chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


def wait(what, check, timeout=60.0, every=0.1):
    start = time.monotonic()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() - start > timeout:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(every)


def no_alert(driver, where):
    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        return
    raise AssertionError(f"a script ran on {where}: an alert said {text!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--errored", required=True)
    ap.add_argument("--hostile", required=True)
    ap.add_argument("--screenshots", required=True)
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args()
    os.makedirs(args.screenshots, exist_ok=True)
    shot = lambda name: driver.save_screenshot(os.path.join(args.screenshots, name))

    driver = browser()
    try:
        # 1. The overview, and the batch's bar advancing as the worker drains it.
        driver.get(args.base + "/ui/")
        assert driver.find_element(By.TAG_NAME, "h1").text == "Overview"
        wait("live updates", lambda: "live updates: " in driver.find_element(By.ID, "live").text
             and "connecting" not in driver.find_element(By.ID, "live").text)
        bar = driver.find_element(By.CSS_SELECTOR, f'progress[data-batch="{args.batch}"]')
        value = lambda: float(bar.get_attribute("value"))
        maximum = float(bar.get_attribute("max"))
        first = value()
        assert first == 0, f"the batch ran before it was due ({first}/{maximum})"
        with open(args.ready_file, "w") as f:
            f.write("watching\n")
        wait("the batch's bar to move", lambda: value() > first)
        middle = value()
        shot("overview.png")
        wait("the batch's bar to fill", lambda: value() >= maximum)
        text = driver.find_element(By.CSS_SELECTOR, f'[data-batch-text="{args.batch}"]').text
        assert text.startswith(f"{int(maximum)} completed"), text
        print(f"overview: the batch's bar went {first:.0f} -> {middle:.0f} -> {value():.0f} of {maximum:.0f} without a reload")
        driver.get(args.base + "/ui/batches")
        shot("batches.png")

        # 2. The hostile file name is text, and nothing ran.
        driver.get(args.base + "/ui/jobs?status=error")
        links = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.jobs td a")]
        assert args.hostile in links, f"{args.hostile!r} not among {links}"
        assert driver.execute_script("return document.querySelectorAll('main img').length") == 0
        no_alert(driver, "the job list")
        shot("jobs.png")
        hostile = next(a for a in driver.find_elements(By.CSS_SELECTOR, "table.jobs td a")
                       if a.text == args.hostile)
        hostile.click()
        wait("the hostile job's page", lambda: driver.find_element(By.TAG_NAME, "h1").text == args.hostile)
        no_alert(driver, "the hostile job's page")
        print("hostile file name: shown as text on the list and its page; no script ran")

        # 3. The errored job: retry refused without the token, done with it.
        driver.get(args.base + f"/ui/jobs/{args.errored}")
        status = lambda: driver.find_element(By.CSS_SELECTOR, f'dd[data-job-status="{args.errored}"]').text
        assert status() == "error", status()
        history = driver.find_elements(By.CSS_SELECTOR, "table.errors tbody tr")
        assert len(history) >= 1, "the error history is empty"
        shot("job-error.png")
        retry = driver.find_element(By.CSS_SELECTOR, "button[data-action$='/retry']")
        result = driver.find_element(By.CSS_SELECTOR, "p.actions .result")
        retry.click()
        wait("the refusal", lambda: "needs the dashboard token" in result.text)
        driver.find_element(By.ID, "token").send_keys("not-the-token-at-all")
        driver.find_element(By.ID, "token-use").click()
        retry.click()
        wait("the wrong token's refusal", lambda: result.text.startswith("403"))
        print(f"without the token: {result.text!r}")
        driver.find_element(By.ID, "token").send_keys(args.token)
        driver.find_element(By.ID, "token-use").click()
        retry.click()
        wait("the retry", lambda: result.text == "pending again")
        # The page reads itself again when the status changes.
        def completed():
            try:
                return status() == "completed" and driver.find_element(By.ID, "records").text == "1"
            except Exception:  # the page is being replaced
                return False
        wait("the job to complete and its page to show its record", completed)
        shot("job-completed.png")
        attempt = driver.find_element(By.CSS_SELECTOR, f'[data-job-attempt="{args.errored}"]').text
        print(f"errored job: retried with the token, completed (attempt {attempt}, 1 record in Chroma)")

        # The page's own script broke no Content-Security-Policy rule.
        problems = [e["message"] for e in driver.get_log("browser")
                    if e["level"] == "SEVERE" and "Content Security Policy" in e["message"]]
        assert not problems, problems
        print("screenshots:", ", ".join(sorted(os.listdir(args.screenshots))))
    except Exception:
        shot("failure.png")
        raise
    finally:
        driver.quit()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"dashboard check failed: {e}", file=sys.stderr)
        sys.exit(1)
