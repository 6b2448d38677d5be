"""The web console driven in headless Chromium (Playwright for Python, Debian's chromium).

Started by tests/tests/console.rs, which sets up a real chute-cloud and a real chuted
and passes everything through CONSOLE_* / CHUTECTL* environment variables. Every step
finds controls by role and accessible name, as assistive technology would. Screenshots
of every page go to $CONSOLE_OUT.
"""

import os
import shlex
import subprocess
import sys
import time
import urllib.parse

from playwright.sync_api import expect, sync_playwright

URL = os.environ["CONSOLE_URL"]
TOKEN = os.environ["CONSOLE_TOKEN"]
DEVICE = os.environ["CONSOLE_DEVICE"]
CHUTE = os.environ["CONSOLE_CHUTE"]
CHUTE_DIR = os.environ["CONSOLE_CHUTE_DIR"]
OUT = os.environ["CONSOLE_OUT"]
PROFILE = os.environ["CONSOLE_PROFILE"]
CHUTECTL = os.environ["CHUTECTL"]
PREFIX = CHUTE.rsplit("-", 1)[0]
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
T = 60_000  # ms

# Without the background-networking flags Chromium tries to reach Google services, and
# this closed network refuses (slowly).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

problems = []


def shot(page, name):
    """Keeps a screenshot, and checks the page as assistive technology meets it: every
    input has a label and every button a visible text label."""
    unlabelled = page.evaluate(
        """() => [
            ...[...document.querySelectorAll("input:not([type=hidden]), select, textarea")]
                .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label"))
                .map((e) => `input ${e.id || e.name}`),
            ...[...document.querySelectorAll("button")]
                .filter((b) => !b.textContent.trim())
                .map((b) => `button ${b.id}`),
        ]"""
    )
    assert not unlabelled, f"{name}: unlabelled {unlabelled}"
    page.screenshot(path=os.path.join(OUT, f"{name}.png"), full_page=True)


def step(msg):
    print(f"console test: {msg}", flush=True)


def sign(page, what):
    """Confirms the signing dialog after checking it shows the decoded command."""
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible(timeout=T)
    expect(page.locator("#confirm-what")).to_contain_text(what)
    page.get_by_role("button", name="Sign and send").click()


def codec_in_browser(ctx):
    """Runs the codec's cases (cloud/assets/codec.cases.mjs) against the Rust golden
    fixtures inside Chromium. Files are served by request interception under
    http://localhost/ (a secure context, which WebCrypto needs)."""
    page = ctx.new_page()

    def serve(route):
        path = urllib.parse.urlparse(route.request.url).path
        if path == "/":
            return route.fulfill(body="<!doctype html><title>codec</title>", content_type="text/html")
        for prefix, base, ctype in [
            ("/assets/", "cloud/assets", "text/javascript"),
            ("/golden/", "proto/tests/golden", "text/plain"),
        ]:
            rest = path[len(prefix):]
            if path.startswith(prefix) and ".." not in rest:
                return route.fulfill(path=os.path.join(REPO, base, rest), content_type=ctype)
        return route.fulfill(status=404, body="")

    page.route("http://localhost/**", serve)
    page.goto("http://localhost/")
    results = page.evaluate(
        """async () => {
            const c = await import("/assets/codec.js");
            const m = await import("/assets/codec.cases.mjs");
            const fx = {};
            for (const n of m.FIXTURES) {
                fx[n] = c.unhex((await (await fetch(`/golden/${n}.hex`)).text()).trim());
            }
            return m.runAll((n) => fx[n].slice());
        }"""
    )
    page.close()
    bad = [r for r in results if not r["ok"]]
    assert len(results) >= 7 and not bad, results
    step(f"codec in Chromium: {len(results)} cases against the golden fixtures passed")


def main():
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            PROFILE,
            executable_path="/usr/bin/chromium",
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        codec_in_browser(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        # Script errors and CSP violations; failed loads are checked by response below.
        page.on(
            "console",
            lambda m: problems.append(f"console {m.type}: {m.text}")
            if (m.type == "error" and not m.text.startswith("Failed to load resource"))
            or "Content Security Policy" in m.text
            else None,
        )
        # Every request of the console succeeds, except asking whether an image blob is
        # already uploaded (404: not yet, upload from 0).
        page.on(
            "response",
            lambda r: problems.append(f"HTTP {r.status}: {r.request.method} {r.url}")
            if r.status >= 400
            and not (r.status == 404 and "/api/v1/blobs/" in r.url and r.request.method == "GET")
            else None,
        )
        # No request may leave the machine (no CDN, no fonts from outside).
        page.on(
            "request",
            lambda r: problems.append(f"request off the console: {r.url}")
            if not r.url.startswith(URL) and not r.url.startswith("data:")
            else None,
        )

        step("sign in")
        resp = page.goto(URL + "/")
        csp = resp.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "unsafe" not in csp, csp
        expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
        shot(page, "01-signin")
        page.get_by_label("API token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Devices", exact=True)).to_be_visible()
        cookies = {c["name"]: c for c in ctx.cookies()}
        session = cookies["chute_session"]
        assert session["httpOnly"] and session["sameSite"] == "Strict", session

        step("requests without the session's CSRF token are refused")
        r = page.request.post(
            URL + "/api/v1/claim-tokens", data="{}", headers={"content-type": "application/json"}
        )
        assert r.status == 403 and "CSRF" in r.text(), (r.status, r.text())
        r = page.request.post(f"{URL}/devices/{DEVICE}/accept", form={"csrf": "forged"})
        assert r.status == 403, r.status

        step("accept the pending device")
        pending = page.locator("#pending")
        expect(pending).to_contain_text(DEVICE, timeout=T)
        expect(pending).to_contain_text(f"{DEVICE[0:4]}-{DEVICE[4:8]}-{DEVICE[8:12]}")
        shot(page, "02-devices-pending")
        page.get_by_role("button", name=f"Accept {DEVICE}").click()
        row = page.locator("#devices tr", has_text=DEVICE)
        expect(row).to_contain_text("accepted")
        # Heartbeats arrive once accepted: reload until the agent version shows.
        deadline = time.time() + 60
        while "?" in row.locator("td").nth(5).inner_text() and time.time() < deadline:
            time.sleep(1)
            page.reload()
        expect(row).to_contain_text("connected since")
        page.get_by_label("Filter by tag").fill("no-such-tag")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("#devices")).not_to_contain_text(DEVICE)
        page.get_by_label("Filter by tag").fill("")
        page.get_by_role("button", name="Filter").click()
        shot(page, "03-devices")

        step("grant this browser's key with the line the Keys page prints")
        page.get_by_role("link", name="Keys").click()
        expect(page.locator("#my-pubkey")).to_have_text(lambda_hex(), timeout=T)
        page.get_by_label("Chutes to ask for (name or prefix-*)").fill(f"{PREFIX}-*")
        line = page.locator("#grant-line").inner_text().strip()
        argv = shlex.split(line)
        assert argv[:3] == ["chutectl", "grant", "issue"], line
        subprocess.run([CHUTECTL] + argv[1:], check=True, stdout=subprocess.DEVNULL)
        page.reload()
        grants = page.locator("#grants")
        expect(grants).to_contain_text("valid", timeout=T)
        expect(grants).to_contain_text(f"{PREFIX}-*")
        shot(page, "04-keys")

        step("deploy from the page")
        page.get_by_role("link", name="Deploy").click()
        bad = os.path.join(OUT, "bad-chute.toml")
        with open(bad, "w") as f:
            f.write('name = "Bad Name"\nversion = "1"\nimage = "x"\n')
        page.get_by_label("chute.toml").set_input_files(bad)
        expect(page.locator("#manifest-check")).to_contain_text("refused", timeout=T)
        page.get_by_label("chute.toml").set_input_files(os.path.join(CHUTE_DIR, "chute.toml"))
        expect(page.locator("#manifest-check")).to_contain_text(f"valid: {CHUTE} 1.0.0", timeout=T)
        page.get_by_label("Image archive (image.tar; optional)").set_input_files(
            os.path.join(CHUTE_DIR, "image.tar")
        )
        page.get_by_label(DEVICE).check()
        page.get_by_role("button", name="Deploy").click()
        sign(page, f"deploy, chute {CHUTE}, image sha256")
        expect(page.locator("#upload-progress")).to_have_attribute("value", "100")
        outcome = page.locator("#outcomes tr", has_text=DEVICE)
        expect(outcome).to_contain_text("succeeded", timeout=120_000)
        expect(outcome).to_contain_text("verified (device-signed)", timeout=T)
        shot(page, "05-deploy")

        step("the device page: running, with its caps and charts")
        page.goto(f"{URL}/devices/{DEVICE}")
        chute_row = page.locator("#chutes tr", has_text=CHUTE)
        expect(chute_row.locator(".state")).to_have_text("running", timeout=T)
        # A few heartbeats for the charts, then a fresh render.
        time.sleep(8)
        page.reload()
        chute_row = page.locator("#chutes tr", has_text=CHUTE)
        expect(chute_row).to_contain_text("of 64")  # memory cap 64 MiB
        expect(chute_row).to_contain_text("down 8")  # bandwidth cap 8 mbit
        expect(chute_row).not_to_contain_text("no known cap")
        assert chute_row.locator("svg").count() >= 4
        shot(page, "06-device")

        step("follow the logs, hostile lines as text, pause")
        chute_row.get_by_role("link", name="Logs").click()
        page.get_by_role("button", name="Follow").click()
        sign(page, f"logs, chute {CHUTE}, tail 20, follow")
        lines = page.locator("#log-lines li")
        expect(lines.filter(has_text="<img src=x onerror=").first).to_be_visible(timeout=T)
        expect(lines.filter(has_text="<script>window.__pwned=2</script>").first).to_be_visible(timeout=T)
        # The tail in the device-signed result is shown and marked verified.
        expect(page.locator("#log-lines li.verified").first).to_be_visible(timeout=T)
        expect(page.locator("#log-state")).to_contain_text("verified (device-signed)")
        assert page.locator("#log-lines img, #log-lines script").count() == 0
        assert page.evaluate("window.__pwned === undefined")
        page.get_by_role("button", name="Pause").click()
        held = lines.count()
        time.sleep(2.5)
        assert lines.count() == held, "lines kept arriving while paused"
        page.get_by_role("button", name="Resume").click()
        expect(lines).not_to_have_count(held, timeout=T)
        shot(page, "07-logs")

        step("the dialog shows what the bytes say, not what the button says")
        page.goto(f"{URL}/devices/{DEVICE}")
        stop = page.get_by_role("button", name=f"Stop {CHUTE}")
        # As a compromised server could: a button labelled Stop that asks for remove.
        stop.evaluate("b => { b.dataset.procedure = 'remove'; }")
        stop.click()
        expect(page.locator("#confirm-what")).to_contain_text(f"remove, chute {CHUTE}")
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#outcome")).to_contain_text("cancelled")

        step("stop from the button; the agent reports it stopped")
        page.goto(f"{URL}/devices/{DEVICE}")
        page.get_by_role("button", name=f"Stop {CHUTE}").click()
        sign(page, f"stop, chute {CHUTE}")
        expect(page.locator("#outcome")).to_contain_text(
            "succeeded, verified (device-signed)", timeout=T
        )
        chute_row = page.locator("#chutes tr", has_text=CHUTE)
        expect(chute_row.locator(".state")).to_have_text("stopped", timeout=T)
        shot(page, "08-device-stopped")

        step("commands: results verified in the browser")
        page.get_by_role("link", name="Commands").click()
        stop_row = page.locator("#commands tr", has_text="stop").first
        expect(stop_row).to_contain_text("verified (device-signed)", timeout=T)
        expect(stop_row.locator("td.decoded")).to_contain_text(f"stop, chute {CHUTE}, timeout 10s, on device {DEVICE}")
        expect(page.locator("#commands td.bad")).to_have_count(0)
        shot(page, "09-commands")

        step("sign out")
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
        page.goto(URL + "/devices")
        expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
        r = page.request.get(URL + "/api/v1/devices")
        assert r.status == 401, r.status
        shot(page, "10-signed-out")
        ctx.close()

    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print("console test: ok")


def lambda_hex():
    import re

    return re.compile(r"^[0-9a-f]{64}$")


if __name__ == "__main__":
    main()
