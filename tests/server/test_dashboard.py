"""The web dashboard (/ui) in a real browser: Debian's Chromium, driven by Playwright, against a real
``corral serve`` with real namespace sandboxes made by the SDK.

Screenshots of the main pages are written to ``$CORRAL_TEST_ARTIFACTS/dashboard`` (default:
``build/test-artifacts/dashboard`` in the checkout); the path is printed at the end of the module.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.chromium]

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [dev] extra)")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT = 30_000  # ms: a sandbox create, a shell starting
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CORRAL_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "dashboard"


@dataclass
class Tenant:
    name: str
    key: str
    key_id: str


@pytest.fixture(scope="module")
def server(corral_server) -> Any:  # type: ignore[no-untyped-def]
    return corral_server


@pytest.fixture(scope="module")
def admin(server: Any) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        yield c


def new_tenant(admin: httpx.Client) -> Tenant:
    name = "ui-" + secrets.token_hex(4)
    assert admin.post("/v1/tenants", json={"name": name}).status_code == 201
    made = admin.post(f"/v1/tenants/{name}/keys", json={"name": "dashboard"}).json()
    return Tenant(name, made["key"], made["key_id"])


@pytest.fixture(scope="module")
def alice(admin: httpx.Client, server: Any) -> Iterator[Tenant]:
    """A tenant whose SDK calls go through the server, as users point it (CORRAL_URL, CORRAL_API_KEY)."""
    t = new_tenant(admin)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORRAL_URL", server.url)
        mp.setenv("CORRAL_API_KEY", t.key)
        yield t
        for info in Sandbox.list():
            Sandbox.connect(info.sandbox_id).kill()


@pytest.fixture(scope="module")
def box(alice: Tenant) -> Iterator[Sandbox]:
    with Sandbox.create(isolation="namespace", timeout=900, metadata={"owner": alice.name}) as sbx:
        yield sbx


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="corral-chromium-") as profile,
        playwright_api.sync_playwright() as p,
    ):
        context = p.chromium.launch_persistent_context(
            profile,  # a fresh user-data dir: nothing from another run
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            accept_downloads=True,
            viewport={"width": 1400, "height": 860},
        )
        try:
            yield context
        finally:
            context.close()
    print(f"\ndashboard screenshots: {ARTIFACTS}")


class Page:
    """A tab with the dashboard, failing the test on any script error or Content-Security-Policy violation."""

    def __init__(self, context: Any, base: str) -> None:
        self.base = base
        self.page = context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on(
            "console",
            lambda m: (
                self.problems.append(m.text)
                if "Content Security Policy" in m.text or m.type == "assert"
                else None
            ),
        )
        self.answers: list[str] = []  # what the next prompt() dialogs are answered
        self.page.on("dialog", self._dialog)
        self.page.set_default_timeout(WAIT)

    def _dialog(self, dialog: Any) -> None:
        if dialog.type == "prompt":
            dialog.accept(self.answers.pop(0))
        else:
            dialog.accept()  # confirm() before a kill or a delete

    def sign_in(self, key: str) -> None:
        self.page.goto(self.base + "/ui/")
        self.page.fill("#api-key", key)
        self.page.click("#signin button[type=submit]")
        self.page.wait_for_selector("#signout")

    def shot(self, name: str) -> None:
        self.page.wait_for_timeout(300)  # let the last paint land
        self.page.locator("#app").screenshot(
            path=str(ARTIFACTS / f"{name}.png")
        )  # the page, not the blank below

    def close(self) -> None:
        self.page.close()
        assert not self.problems, self.problems


@pytest.fixture
def tab(browser: Any, server: Any) -> Iterator[Page]:
    p = Page(browser, server.url)
    yield p
    p.close()


def wait_text(tab: Page, selector: str, text: str, timeout: float = 120) -> None:
    """Wait until ``selector`` shows ``text``; on a timeout, say what it and the message line showed."""
    deadline = time.monotonic() + timeout
    while True:
        found = tab.page.locator(selector)
        shown = found.inner_text() if found.count() else "(not on the page)"
        if text in shown:
            return
        if time.monotonic() > deadline:
            messages = tab.page.locator("#messages").inner_text()
            raise AssertionError(f"{selector} never showed {text!r}: {shown!r}; messages: {messages!r}")
        tab.page.wait_for_timeout(250)


def row(tab: Page, sandbox_id: str) -> Any:
    return tab.page.locator(f"#sandbox-rows tr[data-id='{sandbox_id}']")


def test_sign_in_shows_the_apis_message_and_keeps_the_key_out_of_urls_and_cookies(
    tab: Page, browser: Any, alice: Tenant
) -> None:
    tab.page.goto(tab.base + "/ui/")
    tab.page.fill("#api-key", "corral_key-not-a-real-one")
    tab.page.click("#signin button[type=submit]")
    alert = tab.page.locator("#signin [role=alert]")
    alert.wait_for()
    assert alert.inner_text()  # the server's own words, not a generic failure
    assert "key" in alert.inner_text().lower()
    tab.shot("sign-in")
    tab.page.fill("#api-key", alice.key)
    tab.page.click("#signin button[type=submit]")
    tab.page.wait_for_selector("#sandboxes")
    assert alice.key not in tab.page.url
    assert browser.cookies() == []
    assert tab.page.evaluate("sessionStorage.getItem('corral.apiKey')") == alice.key
    assert tab.page.evaluate("localStorage.length") == 0


def test_a_sandbox_created_by_the_sdk_appears_without_a_reload(
    tab: Page, alice: Tenant, box: Sandbox
) -> None:
    tab.sign_in(alice.key)
    tab.page.wait_for_selector("#live.on")  # the event stream is connected
    tab.page.evaluate("window.__marker = 1")  # survives only if the page is never reloaded
    with Sandbox.create(isolation="namespace", timeout=600, metadata={"job": "ui-appear"}) as sbx:
        r = row(tab, sbx.sandbox_id)
        r.wait_for()
        r.locator(".badge.running").wait_for()
        text = r.inner_text()
        assert "namespace" in text and "job=ui-appear" in text and "MiB" in text
        assert tab.page.evaluate("window.__marker") == 1
        # filter and search work on what is shown
        tab.page.fill("#search", "ui-appear")
        r.wait_for()
        tab.page.fill("#search", "no-such-thing-anywhere")
        r.wait_for(state="detached")
        tab.page.fill("#search", "")
        r.wait_for()
        row(tab, box.sandbox_id).wait_for()  # and the one that was there before
        tab.shot("sandboxes")
        sbx.kill()  # killed elsewhere: the row goes, pushed by the server
        r.wait_for(state="detached")
        assert tab.page.evaluate("window.__marker") == 1


def test_the_terminal_runs_a_command_and_follows_resizes(tab: Page, alice: Tenant, box: Sandbox) -> None:
    tab.sign_in(alice.key)
    tab.page.goto(f"{tab.base}/ui/#/sandbox/{box.sandbox_id}")
    screen = tab.page.locator("#terminal .xterm-rows")
    screen.wait_for()
    tab.page.wait_for_function("() => document.querySelector('#terminal')?.dataset?.processId")
    tab.page.wait_for_function(
        "() => document.querySelector('#terminal .xterm-rows')?.innerText?.includes('$')"
    )
    tab.page.click("#terminal")
    tab.page.keyboard.type("echo $((6*7))-from-the-browser; tty\n")
    tab.page.wait_for_function(
        "() => document.querySelector('#terminal .xterm-rows')?.innerText?.includes('42-from-the-browser')"
    )
    assert "/dev/pts/" in screen.inner_text()
    tab.shot("terminal")

    calls = iter(range(1, 100))

    def size() -> tuple[int, int]:
        mark = f"SIZE{next(calls)}-"  # a fresh marker each time: an older answer on screen cannot match
        tab.page.keyboard.type(f"stty size | sed 's/^/{mark}/'\n")
        tab.page.wait_for_function(
            f"() => /{mark}\\d+ \\d+/.test(document.querySelector('#terminal .xterm-rows')?.innerText ?? '')"
        )
        found = re.findall(mark + r"(\d+) (\d+)", screen.inner_text())
        return int(found[-1][0]), int(found[-1][1])

    rows, cols = size()
    tab.page.set_viewport_size({"width": 900, "height": 860})
    for _ in range(20):  # the fit, the debounced resize request, then the shell's next stty
        new_rows, new_cols = size()
        if new_cols != cols:
            break
        tab.page.wait_for_timeout(500)
    assert new_rows == rows and new_cols < cols, ((rows, cols), (new_rows, new_cols))
    tab.page.set_viewport_size({"width": 1400, "height": 860})


def test_upload_view_and_download_a_file(tab: Page, alice: Tenant, box: Sandbox, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 64 + secrets.token_bytes(1000)  # not text, not UTF-8
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    box.files.write("/tmp/notes.txt", "written by the SDK\nsecond line\n")
    tab.sign_in(alice.key)
    tab.page.goto(f"{tab.base}/ui/#/sandbox/{box.sandbox_id}")
    tab.page.click("button[data-tab=Files]")
    tab.page.fill("#files-path", "/tmp")
    tab.page.click("#pane form button[type=submit]")
    tab.page.locator("#file-rows tr[data-name='notes.txt']").wait_for()
    tab.page.set_input_files("#upload", str(local))
    uploaded = tab.page.locator("#file-rows tr[data-name='payload.bin']")
    uploaded.wait_for()
    assert "uploaded payload.bin" in tab.page.locator("#messages").inner_text()
    assert box.files.read("/tmp/payload.bin") == payload  # byte for byte, in the sandbox
    tab.page.click("#file-rows tr[data-name='notes.txt'] a.view")
    tab.page.wait_for_function(
        "() => document.querySelector('#file-view')?.innerText?.includes('second line')"
    )
    tab.shot("files")
    with tab.page.expect_download() as got:
        uploaded.locator("button.download").click()
    saved = tmp_path / "downloaded.bin"
    got.value.save_as(saved)
    assert got.value.suggested_filename == "payload.bin"
    assert saved.read_bytes() == payload
    # an error is the API's own message
    tab.page.fill("#files-path", "/no/such/dir")
    tab.page.click("#pane form button[type=submit]")
    alert = tab.page.locator("#messages [role=alert]")
    alert.wait_for()
    assert "/no/such/dir" in alert.inner_text()


def test_processes_audit_and_ports_of_one_sandbox(tab: Page, alice: Tenant, box: Sandbox) -> None:
    job = box.commands.start("sh -c 'echo started-in-background; sleep 600'", tag="ui-bg")
    tab.sign_in(alice.key)
    tab.page.goto(f"{tab.base}/ui/#/sandbox/{box.sandbox_id}")
    tab.page.click("button[data-tab=Processes]")
    tab.page.fill("#run-cmd", "echo out-line; echo err-line >&2; exit 3")
    tab.page.click("#pane form button[type=submit]")
    tab.page.wait_for_function(
        "() => document.querySelector('#process-output')?.innerText?.includes('[exit 3]')"
    )
    output = tab.page.locator("#process-output")
    assert "out-line" in output.inner_text()
    assert output.locator(".stderr").inner_text().strip() == "err-line"
    running = tab.page.locator(f"#process-rows tr[data-pid='{job.process_id}']")
    running.wait_for()
    assert "running" in running.inner_text()
    running.click()  # re-attach: its kept output shows
    tab.page.wait_for_function(
        "() => document.querySelector('#process-output')?.innerText?.includes('started-in-background')"
    )
    tab.shot("processes")
    tab.page.click("button[data-tab=Audit]")
    tab.page.wait_for_function(
        "() => document.querySelector('#audit-rows')?.innerText?.includes('process.start')"
    )
    assert "sandbox.create" in tab.page.locator("#audit-rows").inner_text()
    tab.page.click("button[data-tab=Ports]")
    url = tab.page.locator("#port-url a").inner_text()
    assert url == f"http://8000-{box.sandbox_id}.{box.get_info().domain}/"
    job.kill()


def test_kill_from_the_list_and_see_it_leave(tab: Page, alice: Tenant) -> None:
    sbx = Sandbox.create(isolation="namespace", timeout=600, metadata={"job": "ui-kill"})
    try:
        tab.sign_in(alice.key)
        r = row(tab, sbx.sandbox_id)
        r.locator(".badge.running").wait_for()
        r.locator("button[data-action=kill]").click()  # confirm() is accepted by the tab
        r.wait_for(state="detached")
        assert f"killed {sbx.sandbox_id}" in tab.page.locator("#messages").inner_text()
        assert sbx.get_info().state.value == "stopped"
    finally:
        sbx.kill()


def test_another_tenant_sees_none_of_alices_sandboxes(
    tab: Page, admin: httpx.Client, alice: Tenant, box: Sandbox
) -> None:
    bob = new_tenant(admin)
    tab.sign_in(bob.key)
    tab.page.wait_for_selector("#live.on")
    tab.page.wait_for_function(
        "() => document.querySelector('#sandbox-rows')?.innerText?.includes('No sandboxes')"
    )
    assert box.sandbox_id not in tab.page.content()
    tab.page.goto(f"{tab.base}/ui/#/sandbox/{box.sandbox_id}")  # even by its id
    alert = tab.page.locator("#messages [role=alert]")
    alert.wait_for()
    assert "not found" in alert.inner_text()
    assert tab.page.locator("button[data-tab]").count() == 0  # nothing of it to open
    tab.page.goto(f"{tab.base}/ui/#/sandboxes")
    tab.page.wait_for_selector("#live.on")
    with Sandbox.create(isolation="namespace", timeout=300, metadata={"job": "alice-only"}) as other:
        tab.page.wait_for_timeout(2000)  # alice's create pushes nothing to bob
        assert other.sandbox_id not in tab.page.content()


def test_a_revoked_key_sends_the_user_back_to_sign_in(tab: Page, admin: httpx.Client) -> None:
    carol = new_tenant(admin)
    tab.sign_in(carol.key)
    tab.page.wait_for_selector("#live.on")
    assert admin.delete(f"/v1/keys/{carol.key_id}").status_code == 200
    tab.page.click("a[href='#/pools']")  # the next request is refused: back to sign-in, saying why
    alert = tab.page.locator("#signin [role=alert]")
    alert.wait_for()
    assert "revoked" in alert.inner_text()
    assert tab.page.evaluate("sessionStorage.getItem('corral.apiKey')") is None


def test_a_revoked_key_on_an_idle_page_is_signed_out_by_the_stream(tab: Page, admin: httpx.Client) -> None:
    dave = new_tenant(admin)
    tab.sign_in(dave.key)
    tab.page.wait_for_selector("#live.on")
    assert admin.delete(f"/v1/keys/{dave.key_id}").status_code == 200
    # nothing clicked: the event stream checks the key at its next heartbeat (15 s) and says so
    tab.page.locator("#signin [role=alert]").wait_for(timeout=40_000)
    assert "revoked" in tab.page.locator("#signin [role=alert]").inner_text()


def test_the_key_is_not_readable_from_a_sandbox_port_origin(tab: Page, alice: Tenant, box: Sandbox) -> None:
    port = tab.base.rsplit(":", 1)[1]
    tab.base = f"http://localhost:{port}"  # the dashboard on the ports domain's own name, the closest case
    tab.sign_in(alice.key)
    assert tab.page.evaluate("sessionStorage.getItem('corral.apiKey')") == alice.key
    # the same tab, now on the sandbox's port URL (Chromium resolves *.localhost itself)
    tab.page.goto(f"http://8000-{box.sandbox_id}.localhost:{port}/")
    assert tab.page.evaluate("sessionStorage.getItem('corral.apiKey')") is None
    assert tab.page.evaluate("document.cookie") == ""
    # and no path on a port host is the dashboard
    response = tab.page.goto(f"http://8000-{box.sandbox_id}.localhost:{port}/ui/")
    assert response is not None and "content-security-policy" not in response.headers
    assert "app.js" not in tab.page.content()


def test_admin_pages_tenants_keys_audit_pools_and_metrics(tab: Page, server: Any, alice: Tenant) -> None:
    tab.sign_in(server.admin_key)
    tab.page.locator(f"#tenant-rows tr[data-tenant='{alice.name}']").wait_for()
    assert tab.page.locator(f"#key-rows tr[data-key='{alice.key_id}']").count() == 1
    assert alice.key not in tab.page.content()  # only key ids: secrets are never shown again
    tab.shot("tenants")
    tab.page.click("a[href='#/audit']")
    tab.page.wait_for_function(
        "() => document.querySelector('#audit-rows')?.innerText?.includes('tenant.create')"
    )
    tab.page.click("button:has-text('Verify chain')")
    tab.page.wait_for_function(
        "() => document.querySelector('#audit-verify')?.innerText?.includes('chain intact')"
    )
    tab.shot("audit")
    tab.page.click("a[href='#/pools']")
    tab.page.locator("#template-rows tr").first.wait_for()
    tab.shot("pools")
    tab.page.click("a[href='#/metrics']")
    for chart in ("states", "latency", "execs"):
        tab.page.locator(f"#chart-{chart} canvas").wait_for()
    tab.page.wait_for_function(
        "() => document.querySelector('#metric-totals')?.innerText?.includes('sandboxes created')"
    )
    tab.page.wait_for_timeout(5500)  # a second sample: the charts have a line
    tab.shot("metrics")
    totals = tab.page.locator("#metric-totals").inner_text()
    created = int(re.search(r"(\d+) sandboxes created", totals).group(1))  # type: ignore[union-attr]
    assert created >= 1  # this module's own creates, counted by the server itself


@pytest.mark.busybox
def test_a_template_build_and_a_pool_fill_show_their_progress(
    tab: Page, server: Any, admin: httpx.Client, tmp_path: Path
) -> None:
    from _registry import busybox_tree

    rootfs = tmp_path / "rootfs"
    busybox_tree(rootfs)
    name = "ui-bb-" + secrets.token_hex(3)
    tab.sign_in(server.admin_key)
    tab.page.click("a[href='#/pools']")
    tab.page.fill("#build-name", name)
    tab.page.fill("#build-source", str(rootfs))
    tab.page.fill("#build-steps", "echo built-by-the-dashboard > /etc/marker\necho step-two-output")
    tab.page.click("#build-steps ~ button[type=submit]")
    try:
        wait_text(tab, "#messages", f"template {name} built")
        log = tab.page.locator("#build-log").inner_text()
        assert "[step step 1/2]" in log and "[step step 2/2]" in log and "step-two-output" in log, log
        assert "[done]" in log
        tab.page.locator(f"#template-rows tr:has-text('{name}')").wait_for()
        tab.page.fill("#pool-template", name)
        tab.page.fill("#pool-isolation", "namespace")
        tab.page.fill("#pool-size", "2")
        tab.page.click("#pool-size ~ button[type=submit]")
        pool_row = tab.page.locator(f"#pool-rows tr[data-template='{name}']")
        pool_row.wait_for()
        fill_button = pool_row.locator("button:has-text('Fill now')").element_handle()
        fill_button.click()
        wait_text(tab, "#messages", f"pool {name} filled")
        # the fill's progress ends once every member is ready or booting (the server's own reconciler may
        # have started some: those show as starting); the row then follows by server push, as members boot
        assert re.fullmatch(r"[0-2]/2 ready, [0-2] starting", tab.page.locator("#fill-line").inner_text())
        wait_text(tab, f"#pool-rows tr[data-template='{name}'] td:nth-child(4)", "2")
        # pushes patched the row's counts in place: the button clicked is still the one on the page (CI lost a
        # click when a push rebuilt the row between the press and the release)
        assert fill_button.evaluate("b => b.isConnected")
        tab.shot("pools")
        pool_row.locator("button:has-text('Delete')").click()
        pool_row.wait_for(state="detached")
    finally:
        admin.delete(f"/v1/pools/{name}", params={"isolation": "namespace"})
        admin.delete(f"/v1/templates/{name}")


HOSTILE_PAGE = """<!doctype html>
<title>a page served from a sandbox</title>
<iframe id="frame" src="{dashboard}/ui/"></iframe>
"""


def test_a_page_served_by_a_sandbox_can_neither_frame_nor_call_the_dashboard(
    tab: Page, alice: Tenant
) -> None:
    from _sandbox_apps import wait_for_line

    port = tab.base.rsplit(":", 1)[1]
    dashboard = f"http://localhost:{port}"
    tab.base = dashboard
    tab.sign_in(alice.key)  # signed in, in this browser, on the dashboard's origin
    with Sandbox.create(isolation="namespace", timeout=300, public_ports=True) as sbx:
        sbx.files.write("/tmp/site/index.html", HOSTILE_PAGE.format(dashboard=dashboard))
        server = sbx.commands.start("python3 -u -m http.server 8000 --bind 127.0.0.1 --directory /tmp/site")
        wait_for_line(server, "Serving HTTP")
        tab.page.goto(f"http://8000-{sbx.sandbox_id}.localhost:{port}/")
        assert tab.page.title() == "a page served from a sandbox"
        tab.page.wait_for_timeout(1000)
        framed = [f for f in tab.page.frames if f is not tab.page.main_frame]
        assert framed, "the iframe element is there"
        for frame in framed:  # frame-ancestors 'none': the browser shows its error page, not the dashboard
            assert not frame.url.startswith(dashboard), frame.url
            assert frame.locator("#api-key").count() == 0
        # the API sends no CORS headers: the sandbox's script cannot read an answer, with or without a key
        outcome = tab.page.evaluate(
            """async (url) => {
                 try { const r = await fetch(url + "/v1/sandboxes", {headers: {authorization: "Bearer x"}});
                       return "read " + r.status; }
                 catch (e) { return "blocked"; } }""",
            dashboard,
        )
        assert outcome == "blocked"
        assert tab.page.evaluate("sessionStorage.length") == 0
        server.kill()
    # the browser said why it refused the frame; that is the one CSP report this test expects
    refused = [p for p in tab.problems if "frame-ancestors 'none'" in p]
    assert refused, tab.problems
    tab.problems = [p for p in tab.problems if p not in refused]


def test_pause_resume_extend_fork_and_snapshot_from_the_list(
    tab: Page, alice: Tenant, admin: httpx.Client
) -> None:
    snapshot = "ui-snap-" + secrets.token_hex(3)
    sbx = Sandbox.create(isolation="namespace", timeout=300, metadata={"job": "ui-actions"})
    forks: list[str] = []
    try:
        sbx.files.write("/tmp/state", "kept across the fork\n")
        tab.sign_in(alice.key)
        r = row(tab, sbx.sandbox_id)
        r.locator(".badge.running").wait_for()
        r.locator("button[data-action=pause]").click()
        r.locator(".badge.paused").wait_for()  # the new state arrives by push
        assert r.locator(".left").inner_text() == "paused"
        r.locator("button[data-action=resume]").click()
        r.locator(".badge.running").wait_for()
        tab.answers.append("1800")
        r.locator("button[data-action=extend]").click()
        tab.page.locator("#messages .notice").filter(has_text="now ends in 1800s").wait_for()
        left = sbx.get_info().expires_at
        assert left is not None and 1700 < left - time.time() <= 1800
        tab.page.wait_for_function(
            f"() => document.querySelector(\"tr[data-id='{sbx.sandbox_id}'] .left\")?.innerText?.startsWith('29m')"
        )
        tab.answers.append("1")
        r.locator("button[data-action=fork]").click()
        note = tab.page.locator("#messages .notice").filter(has_text="forked: ")
        note.wait_for()
        forks = re.findall(r"sb-[a-z2-7]{16}", note.inner_text())
        assert len(forks) == 1
        row(tab, forks[0]).wait_for()  # the copy shows up by itself
        assert Sandbox.connect(forks[0]).files.read("/tmp/state") == b"kept across the fork\n"
        tab.answers.append(snapshot)
        r.locator("button[data-action=snapshot]").click()
        tab.page.locator("#messages .notice").filter(has_text=f"template {snapshot}").wait_for()
        mine = httpx.get(
            f"{tab.base}/v1/templates", headers={"Authorization": f"Bearer {alice.key}"}, timeout=30
        ).json()["templates"]
        assert any(t["name"] == snapshot and t["kind"] == "snapshot" for t in mine)
        # a bad answer gets the API's own message
        tab.answers.append("-5")
        r.locator("button[data-action=extend]").click()
        alert = tab.page.locator("#messages [role=alert]")
        alert.wait_for()
        assert "timeout" in alert.inner_text().lower()
    finally:
        for sid in [sbx.sandbox_id, *forks]:
            Sandbox.connect(sid).kill()
        admin.delete(f"/v1/templates/{snapshot}")


def test_an_admin_makes_a_tenant_a_key_and_quotas_in_the_page(tab: Page, server: Any) -> None:
    name = "ui-new-" + secrets.token_hex(3)
    tab.sign_in(server.admin_key)
    tab.page.fill("#tenant-name", name)
    tab.page.click("#tenant-name ~ button[type=submit]")
    tenant = tab.page.locator(f"#tenant-rows tr[data-tenant='{name}']")
    tenant.wait_for()
    tab.answers.append("made-in-the-dashboard")
    tenant.locator("button:has-text('New key')").click()
    shown = tab.page.locator("#new-key-value")
    shown.wait_for()
    key = shown.inner_text()
    assert key.startswith("corral_key-")
    made = httpx.get(f"{tab.base}/v1/sandboxes", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert made.status_code == 200 and made.json()["sandboxes"] == []  # a working key of the new tenant
    tab.page.locator("#key-rows tr", has_text="made-in-the-dashboard").wait_for()
    tab.answers.append('{"max_sandboxes": 3, "max_memory_mb": 2048}')
    tenant.locator("button:has-text('Quotas')").click()
    wait_text(tab, f"#tenant-rows tr[data-tenant='{name}']", "2048", timeout=30)
    assert "3" in tenant.locator("td:nth-child(3)").inner_text()
    tab.answers.append('{"max_sandboxes": -1}')  # the API's own refusal, word for word
    tenant.locator("button:has-text('Quotas')").click()
    alert = tab.page.locator("#messages [role=alert]")
    alert.wait_for()
    assert "max_sandboxes" in alert.inner_text()
