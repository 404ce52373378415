#!/usr/bin/env python3
"""Takes the guides' screenshots from the demo (scripts/screenshots.sh runs it).

    scripts/screenshots.py BINARY DATABASE_URL

Runs the demo in DATABASE_URL (an empty database) with a temporary copy of jobs/demo.toml,
photographs its first run's report.html with headless Chromium, then starts `callrecon serve`, signs in
to the review desk through chromedriver (WebDriver over HTTP: the standard library is enough)
and photographs the queue and the page of the event the demo names as ambiguous.
"""
import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]
DOCS = Path("docs")


def callrecon(binary, url, *args):
    out = subprocess.run([binary, "--database-url", url, *args], capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        sys.exit(f"callrecon {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def webdriver(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["value"]


def main():
    binary, url = sys.argv[1], sys.argv[2]
    work = Path(tempfile.mkdtemp(prefix="callrecon-shots-"))
    procs = []
    try:
        job = work / "demo.toml"
        shutil.copy("jobs/demo.toml", job)
        demo = callrecon(binary, url, "demo", "--samples", "samples", "--job", str(job))
        # The first run's report: the one with every kind of outcome.
        report = re.search(r"^report: (\S+)", demo, re.M).group(1)
        event = re.search(r"callrecon explain --job \S+ (\d+)", demo).group(1)
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={work / 'profile-report'}",
                        "--window-size=1400,1900", f"--screenshot={DOCS / 'report.png'}",
                        f"file://{report}"], check=True, capture_output=True, timeout=120)

        added = callrecon(binary, url, "users", "add", "ana", "--role", "Analyst")
        secret = re.search(r"client_secret:\s+(\S+)", added).group(1)
        serve = subprocess.Popen([binary, "--database-url", url, "serve", "--listen", "127.0.0.1:0",
                                  "--job", str(job)], stdout=subprocess.PIPE, text=True)
        procs.append(serve)
        desk = re.search(r"listening on (\S+)", serve.stdout.readline()).group(1)
        port = free_port()
        procs.append(subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if webdriver(base, "GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        args = FLAGS + [f"--user-data-dir={work / 'profile-desk'}", "--window-size=1400,900"]
        session = webdriver(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}})["sessionId"]
        s = f"/session/{session}"

        def element(css):
            found = webdriver(base, "POST", f"{s}/element", {"using": "css selector", "value": css})
            return next(iter(found.values()))

        def shoot(path, name):
            webdriver(base, "POST", f"{s}/url", {"url": desk + path})
            (DOCS / name).write_bytes(base64.b64decode(webdriver(base, "GET", f"{s}/screenshot")))
            print(f"wrote docs/{name} ({desk}{path})")

        webdriver(base, "POST", f"{s}/url", {"url": desk + "/review/login"})
        webdriver(base, "POST", f"{s}/element/{element('#name')}/value", {"text": "ana"})
        webdriver(base, "POST", f"{s}/element/{element('#secret')}/value", {"text": secret})
        webdriver(base, "POST", f"{s}/element/{element('#sign-in')}/click", {})
        shoot("/review", "review-queue.png")
        shoot(f"/review/events/{event}", "review-event.png")
        webdriver(base, "DELETE", s)
        print("wrote docs/report.png (" + report + ")")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
