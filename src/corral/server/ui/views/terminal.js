// A terminal into a sandbox: xterm.js over the API's PTY operations. POST …/pty opens it (at the size the
// terminal fits), GET …/processes/{id}/events streams its output, POST …/stdin carries keystrokes (coalesced:
// one request in flight, the rest batched behind it), POST …/resize follows the element's size.
import { Terminal } from "../vendor/xterm.mjs";
import { FitAddon } from "../vendor/addon-fit.mjs";
import { latin1Bytes, post, request, sandboxPath, session, stream } from "../api.js";

export function openTerminal(container, sandboxId, msg) {
  const term = new Terminal({
    cursorBlink: true, fontSize: 13, scrollback: 5000,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(container);
  fit.fit();
  const controller = new AbortController();
  const encoder = new TextEncoder();
  let processId = null;
  let closed = false;
  let pending = "";
  let sending = false;

  async function flush() {
    if (sending || !pending || !processId) return;
    sending = true;
    const chunk = pending;
    pending = "";
    try {
      await request("POST", sandboxPath(sandboxId, `/processes/${processId}/stdin`), { raw: encoder.encode(chunk) });
    } catch (error) {
      if (!closed) msg.error(error);
    }
    sending = false;
    flush();
  }

  let resizeTimer = null;
  term.onResize(({ cols, rows }) => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (processId && !closed) {
        post(sandboxPath(sandboxId, `/processes/${processId}/resize`), { cols, rows }).catch((e) => msg.error(e));
      }
    }, 150);
  });
  term.onData((data) => { pending += data; flush(); });
  const observer = new ResizeObserver(() => { try { fit.fit(); } catch { /* detached */ } });
  observer.observe(container);

  (async () => {
    try {
      const started = await post(sandboxPath(sandboxId, "/pty"), { cols: term.cols, rows: term.rows });
      processId = started.process_id;
      container.dataset.processId = processId;
      flush();
      await stream("GET", sandboxPath(sandboxId, `/processes/${processId}/events`), (event) => {
        if (event.data && (event.kind === "pty" || event.kind === "stdout" || event.kind === "stderr")) {
          term.write(latin1Bytes(event.data));
        } else if (event.kind === "exit") {
          term.write(`\r\n\x1b[2m[exited${event.exit_code !== undefined ? " with " + event.exit_code : ""}]\x1b[0m\r\n`);
        }
      }, { signal: controller.signal });
    } catch (error) {
      if (!closed && error.name !== "AbortError") {
        msg.error(error);
        term.write(`\r\n\x1b[31m${error.message}\x1b[0m\r\n`);
      }
    }
  })();
  term.focus();
  // leaving the page (reload, tab closed) ends the shell too; keepalive lets the request outlive the page
  const onHide = () => {
    if (!processId || closed) return;
    fetch(sandboxPath(sandboxId, `/processes/${processId}/signal`), {
      method: "POST", keepalive: true, credentials: "omit",
      headers: { authorization: `Bearer ${session.key}`, "content-type": "application/json" },
      body: JSON.stringify({ signal: 1 }),
    }).catch(() => {});
  };
  window.addEventListener("pagehide", onHide);

  return {
    term,
    close() {
      window.removeEventListener("pagehide", onHide);
      closed = true;
      observer.disconnect();
      controller.abort();
      if (processId) {  // the shell ends with the tab that opened it
        post(sandboxPath(sandboxId, `/processes/${processId}/signal`), { signal: 1 }).catch(() => {});
      }
      term.dispose();
    },
  };
}
