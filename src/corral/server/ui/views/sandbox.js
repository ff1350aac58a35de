// One sandbox: what it is, and tabs for its terminal, processes, files, ports and audit entries.
import { del, get, latin1Bytes, post, request, sandboxPath, stream } from "../api.js";
import { ago, bytes, h, now, replace, when } from "../dom.js";
import { attempt, liveEvents, messages, stateBadge } from "./common.js";
import { openTerminal } from "./terminal.js";

export function sandboxView(main, id) {
  const msg = messages();
  const info = h("div", { class: "panel", id: "sandbox-info" }, h("span", { class: "muted" }, "Loading…"));
  const tabBar = h("div", { class: "tabs" });
  const pane = h("div", { class: "panel", id: "pane" });
  replace(main,
    h("h1", {}, h("a", { href: "#/sandboxes" }, "Sandboxes"), " / ", h("span", { class: "mono" }, id)),
    msg.el, info, tabBar, pane);
  let sandbox = null;
  let cleanup = null;
  const tabs = {
    Terminal: () => terminalTab(pane, id, msg),
    Processes: () => processesTab(pane, id, msg),
    Files: () => filesTab(pane, id, msg),
    Ports: () => portsTab(pane, () => sandbox),
    Audit: () => auditTab(pane, id, msg),
  };
  function show(name) {
    if (cleanup) { cleanup(); cleanup = null; }
    for (const b of tabBar.children) b.classList.toggle("active", b.dataset.tab === name);
    replace(pane);
    cleanup = tabs[name]() || null;
  }

  function renderInfo() {
    const sb = sandbox;
    const path = (rest) => sandboxPath(id, rest);
    const live = sb.state !== "stopped";
    replace(info,
      h("div", { class: "row" },
        stateBadge(sb.state),
        h("span", {}, `${sb.isolation} · ${sb.template} · ${sb.memory_mb} MiB · ${sb.cpus} CPU`),
        h("span", { class: "muted" }, `age ${ago(now() - sb.created_at)}`,
          sb.expires_at ? ` · ends in ${ago(sb.expires_at - now())}` : "", sb.stop_reason ? ` · ${sb.stop_reason}` : ""),
        h("span", { style: undefined }, Object.entries(sb.metadata || {}).map(([k, v]) => h("span", { class: "meta" }, `${k}=${v}`))),
        live && h("span", { class: "row" },
          sb.state === "paused"
            ? h("button", { onclick: () => attempt(msg, () => post(path("/resume")), "resumed") }, "Resume")
            : h("button", { onclick: () => attempt(msg, () => post(path("/pause")), "paused") }, "Pause"),
          h("button", { onclick: () => { const s = prompt("Seconds of life, from now:", "600"); if (s) attempt(msg, () => post(path("/timeout"), { timeout: Number(s) }), `now ends in ${s}s`); } }, "Extend"),
          h("button", { class: "danger", id: "kill", onclick: () => { if (confirm(`Kill ${id}?`)) attempt(msg, () => del(path("")), `killed ${id}`); } }, "Kill"))));
  }

  get(sandboxPath(id)).then((sb) => {
    sandbox = sb;
    renderInfo();
    replace(tabBar, Object.keys(tabs).map((name) => h("button", { dataset: { tab: name }, onclick: () => show(name) }, name)));
    show(sb.state === "running" ? "Terminal" : "Audit");
  }).catch((e) => {
    msg.error(e);
    replace(info, h("span", { class: "muted" }, "This sandbox cannot be shown."));
  });
  const stop = liveEvents((event) => {
    if (event.type === "sandbox" && event.sandbox.sandbox_id === id) { sandbox = event.sandbox; renderInfo(); }
  }, () => {}, () => {});
  const tick = setInterval(() => { if (sandbox) renderInfo(); }, 5000);
  return () => { stop(); clearInterval(tick); if (cleanup) cleanup(); };
}

function terminalTab(pane, id, msg) {
  const box = h("div", { class: "terminal", id: "terminal" });
  replace(pane, h("p", { class: "muted" }, "A login shell in the sandbox; it ends when you leave this tab."), box);
  const terminal = openTerminal(box, id, msg);
  return () => terminal.close();
}

function processesTab(pane, id, msg) {
  const rows = h("tbody", { id: "process-rows" });
  const output = h("pre", { class: "output", id: "process-output" });
  const title = h("h2", {}, "Output");
  const cmd = h("input", { id: "run-cmd", placeholder: "command, e.g. ls -la /", size: 50 });
  let controller = null;
  const form = h("form", { class: "row" }, cmd, h("label", {}, h("input", { type: "checkbox", id: "run-bg" }), " background"),
    h("button", { class: "primary", type: "submit" }, "Run"));
  replace(pane, form, h("table", {}, h("thead", {}, h("tr", {}, ["Process", "Command", "State", "Started", ""].map((t) => h("th", {}, t)))), rows),
    h("div", { class: "row" }, h("button", { onclick: refresh }, "Refresh")), title, output);

  function showOutput(processId, label, opener) {
    if (controller) controller.abort();
    controller = new AbortController();
    replace(output);
    replace(title, "Output of ", h("span", { class: "mono" }, label));
    const decoder = new TextDecoder();
    const onEvent = (event) => {
      if (event.data) output.append(h("span", { class: event.kind === "stderr" ? "stderr" : "" }, decoder.decode(latin1Bytes(event.data), { stream: true })));
      if (event.kind === "exit") output.append(h("span", { class: "muted" }, `\n[exit ${event.exit_code ?? ""}${event.signal ? " signal " + event.signal : ""}]`));
    };
    (opener ? opener(onEvent, controller.signal) : stream("GET", sandboxPath(id, `/processes/${processId}/events`), onEvent, { signal: controller.signal }))
      .then(refresh).catch((e) => { if (e.name !== "AbortError") msg.error(e); });
  }

  async function refresh() {
    const list = await attempt(msg, () => get(sandboxPath(id, "/processes")));
    if (!list) return;
    const procs = list.processes.sort((a, b) => b.started_at - a.started_at);
    replace(rows, procs.length ? procs.map((p) => h("tr", { class: "clickable", dataset: { pid: p.process_id }, onclick: () => showOutput(p.process_id, p.argv.join(" ")) },
      h("td", { class: "mono" }, p.process_id, h("div", { class: "muted" }, `pid ${p.pid}`)),
      h("td", { class: "mono" }, p.argv.join(" ")),
      h("td", {}, p.running ? h("span", { class: "badge running" }, "running") : `exit ${p.exit_code ?? ""}${p.signal ? " (signal " + p.signal + ")" : ""}`),
      h("td", {}, when(p.started_at)),
      h("td", {}, p.running ? h("button", { class: "danger", onclick: (e) => { e.stopPropagation(); attempt(msg, () => post(sandboxPath(id, `/processes/${p.process_id}/signal`), { signal: 15 }), `sent SIGTERM to ${p.process_id}`).then(refresh); } }, "Stop") : null)))
      : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No processes running or kept.")));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = cmd.value.trim();
    if (!text) return;
    const background = document.getElementById("run-bg").checked;
    showOutput(null, text, (onEvent, signal) => stream("POST", sandboxPath(id, "/processes"), onEvent, { body: { cmd: text, background }, signal }));
  });
  refresh();
  return () => { if (controller) controller.abort(); };
}

function filesTab(pane, id, msg) {
  const pathInput = h("input", { id: "files-path", value: "/tmp", size: 50 });
  const rows = h("tbody", { id: "file-rows" });
  const viewer = h("pre", { class: "output", id: "file-view" });
  const viewerTitle = h("h2", {});
  const upload = h("input", { type: "file", id: "upload", multiple: true });
  const go = h("form", { class: "row" }, h("label", { for: "files-path" }, "Directory"), pathInput, h("button", { type: "submit" }, "List"),
    h("button", { type: "button", onclick: () => { const p = parentOf(pathInput.value); pathInput.value = p; list(); } }, "Up"),
    h("label", { class: "muted" }, "Upload here:"), upload);
  replace(pane, go, h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Type", "Size", "Modified", ""].map((t) => h("th", {}, t)))), rows), viewerTitle, viewer);

  const join = (dir, name) => (dir.endsWith("/") ? dir : dir + "/") + name;
  async function fetchFile(path) {
    const response = await request("GET", sandboxPath(id, "/files"), { query: { path } });
    return response.blob();
  }
  async function list() {
    const dir = pathInput.value.trim() || "/";
    const result = await attempt(msg, () => get(sandboxPath(id, "/files/list"), { path: dir, depth: 1 }));
    if (!result) return;
    const entries = result.entries.sort((a, b) => (a.type === "dir") === (b.type === "dir") ? a.name.localeCompare(b.name) : a.type === "dir" ? -1 : 1);
    replace(rows, entries.length ? entries.map((e) => h("tr", { dataset: { name: e.name } },
      h("td", { class: "mono" }, e.type === "dir"
        ? h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); pathInput.value = e.path; list(); } }, e.name + "/")
        : h("a", { href: "#", class: "view", onclick: (ev) => { ev.preventDefault(); view(e); } }, e.name)),
      h("td", {}, e.type), h("td", {}, e.type === "file" ? bytes(e.size) : ""), h("td", {}, when(e.mtime)),
      h("td", {}, e.type === "file" ? h("button", { class: "download", onclick: () => download(e) }, "Download") : null)))
      : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "Empty directory.")));
  }
  async function view(e) {
    const blob = await attempt(msg, () => fetchFile(e.path));
    if (!blob) return;
    replace(viewerTitle, h("span", { class: "mono" }, e.path));
    const head = new Uint8Array(await blob.slice(0, 256 * 1024).arrayBuffer());
    const binary = head.includes(0);
    replace(viewer, binary ? `(binary file, ${bytes(blob.size)}; use Download)` : new TextDecoder().decode(head) + (blob.size > head.length ? "\n…" : ""));
  }
  async function download(e) {
    const blob = await attempt(msg, () => fetchFile(e.path));
    if (!blob) return;
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: e.name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  upload.addEventListener("change", async () => {
    const dir = pathInput.value.trim() || "/";
    const done = [];
    for (const file of upload.files) {
      const ok = await attempt(msg, () => request("PUT", sandboxPath(id, "/files"), { query: { path: join(dir, file.name) }, raw: file }));
      if (!ok) break;
      done.push(`${file.name} (${bytes(file.size)})`);
    }
    upload.value = "";
    await list();
    if (done.length) msg.ok(`uploaded ${done.join(", ")} to ${dir}`);
  });
  go.addEventListener("submit", (event) => { event.preventDefault(); list(); });
  list();
  return null;
}

function parentOf(path) {
  const trimmed = path.replace(/\/+$/, "");
  const i = trimmed.lastIndexOf("/");
  return i <= 0 ? "/" : trimmed.slice(0, i);
}

function portsTab(pane, sandbox) {
  const sb = sandbox();
  const port = h("input", { id: "port", type: "number", min: 1, max: 65535, value: 8000, size: 7 });
  const out = h("div", { id: "port-url" });
  const render = () => {
    const url = `${location.protocol}//${port.value}-${sb.sandbox_id}.${sb.domain || location.host}/`;
    replace(out, h("dl", { class: "kv" },
      h("dt", {}, "URL"), h("dd", {}, h("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "mono" }, url)),
      h("dt", {}, "Access"), h("dd", {}, sb.public_ports ? "public: anyone who can reach the server" : "only with the header Corral-Traffic-Token"),
      !sb.public_ports && h("dt", {}, "Token"), !sb.public_ports && h("dd", { class: "mono" }, sb.traffic_token || ""),
      h("dt", {}, "curl"), h("dd", { class: "mono" }, `curl ${sb.public_ports ? "" : `-H 'Corral-Traffic-Token: ${sb.traffic_token}' `}${url}`)));
  };
  port.addEventListener("input", render);
  replace(pane, h("p", { class: "muted" }, "Every port inside the sandbox has its own origin under the server's ports domain, never this dashboard's."),
    h("div", { class: "row" }, h("label", { for: "port" }, "Port"), port), out);
  render();
  return null;
}

function auditTab(pane, id, msg) {
  const rows = h("tbody", { id: "audit-rows" });
  replace(pane, h("table", {}, h("thead", {}, h("tr", {}, ["#", "When", "Action", "Details"].map((t) => h("th", {}, t)))), rows));
  attempt(msg, () => get(sandboxPath(id, "/audit"))).then((r) => {
    if (!r) return;
    replace(rows, r.entries.map((e) => h("tr", {}, h("td", {}, e.seq), h("td", {}, when(e.at)), h("td", {}, e.action),
      h("td", { class: "mono" }, JSON.stringify(e.details)))));
  });
  return null;
}
