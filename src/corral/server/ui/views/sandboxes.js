// Sandboxes: the tenant's live list, pushed by the server (GET /v1/events), with filters and actions.
import { del, get, post, sandboxPath } from "../api.js";
import { ago, h, now, patchRows, replace } from "../dom.js";
import { attempt, liveEvents, messages, stateBadge } from "./common.js";

export function sandboxesView(main) {
  const sandboxes = new Map(); // id -> sandbox as the API shows it
  const msg = messages();
  const live = h("span", { class: "live", id: "live", title: "server push" });
  const search = h("input", { type: "search", id: "search", placeholder: "Search id, template, metadata…", size: 34 });
  const stateFilter = h("select", { id: "state-filter" },
    ["", "running", "paused", "creating"].map((s) => h("option", { value: s }, s || "any state")));
  const isoFilter = h("select", { id: "isolation-filter" }, h("option", { value: "" }, "any isolation"));
  const body = h("tbody", { id: "sandbox-rows" });
  const count = h("span", { class: "muted", id: "count" });

  const create = createForm(msg);
  replace(main,
    h("h1", {}, live, "Sandboxes ", count),
    msg.el,
    create,
    h("div", { class: "panel" },
      h("div", { class: "row" }, search, stateFilter, isoFilter),
      h("table", { id: "sandboxes" },
        h("thead", {}, h("tr", {}, ["Sandbox", "State", "Isolation", "Template", "Age", "Time left", "Memory / CPU", "Metadata", ""]
          .map((t) => h("th", {}, t)))),
        body)));

  function matches(sb) {
    const q = search.value.trim().toLowerCase();
    if (stateFilter.value && sb.state !== stateFilter.value) return false;
    if (isoFilter.value && sb.isolation !== isoFilter.value) return false;
    if (!q) return true;
    const hay = [sb.sandbox_id, sb.template, sb.isolation, sb.state,
      ...Object.entries(sb.metadata || {}).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase();
    return q.split(/\s+/).every((word) => hay.includes(word));
  }

  function actions(sb) {
    const id = sb.sandbox_id;
    const act = (label, fn, cls) => h("button", { class: cls, dataset: { action: label.toLowerCase() }, onclick: (e) => { e.stopPropagation(); fn(); } }, label);
    const path = (rest) => sandboxPath(id, rest);
    return h("div", { class: "row" },
      sb.state === "paused"
        ? act("Resume", () => attempt(msg, () => post(path("/resume")), `resumed ${id}`))
        : act("Pause", () => attempt(msg, () => post(path("/pause")), `paused ${id}`)),
      act("Extend", () => {
        const s = prompt(`Seconds of life for ${id}, from now:`, "600");
        if (s) attempt(msg, () => post(path("/timeout"), { timeout: Number(s) }), `${id} now ends in ${s}s`);
      }),
      act("Snapshot", () => {
        const name = prompt(`Template name for a snapshot of ${id}:`);
        if (name) attempt(msg, () => post(path("/snapshot"), { name }), (t) => `snapshot saved as template ${t.name}`);
      }),
      act("Fork", () => {
        const n = prompt(`How many copies of ${id}?`, "1");
        if (n) attempt(msg, () => post(path("/fork"), { count: Number(n) }), (r) => `forked: ${r.sandboxes.map((s) => s.sandbox_id).join(", ")}`);
      }),
      act("Kill", () => {
        if (confirm(`Kill ${id}? Its processes and files are gone for good.`)) attempt(msg, () => del(path("")), `killed ${id}`);
      }, "danger"));
  }

  function row(sb) {
    const left = sb.expires_at ? ago(sb.expires_at - now()) : sb.state === "paused" ? "paused" : "";
    return h("tr", { class: "clickable", dataset: { id: sb.sandbox_id, key: sb.sandbox_id }, onclick: () => { location.hash = `#/sandbox/${sb.sandbox_id}`; } },
      h("td", {}, h("a", { href: `#/sandbox/${sb.sandbox_id}`, class: "mono" }, sb.sandbox_id), sb.from_pool ? h("span", { class: "meta" }, "pool") : null),
      h("td", {}, stateBadge(sb.state)),
      h("td", {}, sb.isolation),
      h("td", {}, sb.template),
      h("td", { class: "age" }, ago(now() - sb.created_at)),
      h("td", { class: "left" }, left),
      h("td", {}, `${sb.memory_mb} MiB / ${sb.cpus} CPU`),
      h("td", {}, Object.entries(sb.metadata || {}).map(([k, v]) => h("span", { class: "meta" }, `${k}=${v}`))),
      h("td", {}, actions(sb)));
  }

  function render() {
    const all = [...sandboxes.values()].sort((a, b) => a.created_at - b.created_at);
    const isolations = [...new Set(all.map((s) => s.isolation))].sort();
    const chosen = isoFilter.value;
    replace(isoFilter, h("option", { value: "" }, "any isolation"), isolations.map((i) => h("option", { value: i }, i)));
    isoFilter.value = chosen;
    const shown = all.filter(matches);
    patchRows(body, shown.length ? shown.map(row)
      : [h("tr", {}, h("td", { colspan: 9, class: "muted" }, all.length ? "No sandbox matches the filter." : "No sandboxes running."))]);
    replace(count, `(${shown.length}${shown.length !== all.length ? ` of ${all.length}` : ""})`);
  }

  for (const el of [search, stateFilter, isoFilter]) el.addEventListener("input", render);
  const stop = liveEvents((event) => {
    if (event.type === "snapshot") {
      sandboxes.clear();
      for (const sb of event.sandboxes || []) sandboxes.set(sb.sandbox_id, sb);
    } else if (event.type === "sandbox") {
      const sb = event.sandbox;
      if (event.removed || sb.state === "stopped") sandboxes.delete(sb.sandbox_id);
      else sandboxes.set(sb.sandbox_id, sb);
    } else return;
    render();
  }, (on) => live.classList.toggle("on", on), (e) => msg.error(e));
  // age and time left move with the clock; the data itself only changes when the server says so
  const tick = setInterval(() => {
    for (const tr of body.querySelectorAll("tr[data-id]")) {
      const sb = sandboxes.get(tr.dataset.id);
      if (!sb) continue;
      tr.querySelector(".age").textContent = ago(now() - sb.created_at);
      if (sb.expires_at) tr.querySelector(".left").textContent = ago(sb.expires_at - now());
    }
  }, 1000);
  return () => { stop(); clearInterval(tick); };
}

function createForm(msg) {
  const template = h("select", { id: "new-template" });
  const isolation = h("input", { id: "new-isolation", placeholder: "isolation (default)", size: 16 });
  const timeout = h("input", { id: "new-timeout", type: "number", min: 1, value: 300, size: 6 });
  const metadata = h("input", { id: "new-metadata", placeholder: "key=value, …", size: 24 });
  get("/v1/templates").then((r) => {
    replace(template, h("option", { value: "" }, "default template"), r.templates.map((t) => h("option", { value: t.name }, t.name)));
  }).catch((e) => msg.error(e));
  const form = h("form", { class: "panel row", id: "create" },
    h("strong", {}, "New sandbox"), template, isolation, h("label", {}, "timeout (s)"), timeout, metadata,
    h("button", { class: "primary", type: "submit" }, "Create"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const meta = {};
    for (const pair of metadata.value.split(",").map((s) => s.trim()).filter(Boolean)) {
      const [k, ...v] = pair.split("=");
      meta[k.trim()] = v.join("=").trim();
    }
    const body = { timeout: Number(timeout.value), metadata: meta };
    if (template.value) body.template = template.value;
    if (isolation.value.trim()) body.isolation = isolation.value.trim();
    attempt(msg, () => post("/v1/sandboxes", body), (sb) => `created ${sb.sandbox_id}`);
  });
  return form;
}
