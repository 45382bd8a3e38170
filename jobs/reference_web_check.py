"""The web page as a person uses it, over many slices: how often does it say "tumour present" on
slices whose reference mask is empty (and how often on slices with tumour)?

    python jobs/reference_web_check.py SOURCE [--model reference] [--port 8000] [--out check.json]

Starts `brainseg serve` with the model on 127.0.0.1, drives Debian's Chromium (headless, through its
chromedriver) to upload every slice of SOURCE (the kaggle_3m layout, reference masks beside the
slices) through the page's file input, and reads the "Tumour present" cell the page shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import tifffile


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"brainseg serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not healthy within {timeout:.0f} s")


def _browser(profile: str):
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-default-apps", "--disable-extensions",
                 f"--user-data-dir={profile}", "--window-size=1100,820"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def check(source: Path, model: str, port: int) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # Absolute: chromedriver refuses to upload a relative path (reference_cv.sh's rounds pass one).
    # followlinks: the patients are linked in.
    slices = sorted(Path(folder, name).absolute() for folder, _, names in os.walk(source, followlinks=True)
                    for name in names if name.endswith(".tif") and not name.endswith("_mask.tif"))
    if not slices:
        raise SystemExit(f"{source}: no slice files")
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(tempfile.gettempdir(), f"brainseg-web-check-serve-{port}.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "brainseg_ray.cli", "serve", "--model", model, "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    counts = {"tumour_free": 0, "tumour_free_said_present": 0, "tumour": 0, "tumour_said_present": 0}
    said_present_on_free = []
    try:
        _wait_healthy(url, server)
        with tempfile.TemporaryDirectory() as profile:
            browser = _browser(profile)
            try:
                browser.get(f"{url}/")
                for path in slices:
                    browser.find_element(By.ID, "file").send_keys(str(path))
                    WebDriverWait(browser, 120).until(
                        lambda b: b.find_element(By.ID, "n-file").text == path.name
                        and b.find_element(By.ID, "numbers").get_attribute("data-state") in ("done", "error"))
                    if browser.find_element(By.ID, "numbers").get_attribute("data-state") != "done":
                        raise SystemExit(f"{path}: the page shows an error: {browser.find_element(By.ID, 'status').text}")
                    present = browser.find_element(By.ID, "n-present").text == "yes"
                    tumour = bool(np.any(tifffile.imread(path.with_name(f"{path.stem}_mask.tif"))))
                    key = "tumour" if tumour else "tumour_free"
                    counts[key] += 1
                    counts[f"{key}_said_present"] += int(present)
                    if present and not tumour:
                        said_present_on_free.append(path.name)
            finally:
                browser.quit()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    free = counts["tumour_free"]
    return {**counts, "model": model, "slices": len(slices),
            "tumour_free_said_absent_share": (free - counts["tumour_free_said_present"]) / free if free else None,
            "tumour_said_present_share": counts["tumour_said_present"] / counts["tumour"] if counts["tumour"] else None,
            "tumour_free_files_said_present": said_present_on_free}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder of the kaggle_3m layout, with reference masks")
    parser.add_argument("--model", default="reference")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--out", help="write the counts to this JSON file")
    args = parser.parse_args()
    result = check(Path(args.source), args.model, args.port)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"web page: {result['tumour_free'] - result['tumour_free_said_present']} of {result['tumour_free']} "
          f"tumour-free slices shown as no tumour ({result['tumour_free_said_absent_share']:.4f}); "
          f"{result['tumour_said_present']} of {result['tumour']} tumour slices shown as tumour")
    return 0


if __name__ == "__main__":
    sys.exit(main())
