// Warm pools (target, ready, starting, fill progress) and templates (with builds and their progress).
// Admin keys get pool changes pushed (GET /v1/events); tenant keys read the same numbers on demand.
import { del, get, put, session, stream } from "../api.js";
import { h, patchRows, replace, when } from "../dom.js";
import { attempt, liveEvents, messages } from "./common.js";

export function poolsView(main) {
  const admin = session.role === "admin";
  const msg = messages();
  const poolRows = h("tbody", { id: "pool-rows" });
  const templateRows = h("tbody", { id: "template-rows" });
  const progress = h("div", { id: "fill-progress" });
  const live = h("span", { class: "live", title: "server push" });
  replace(main, h("h1", {}, admin ? live : null, "Pools & templates"), msg.el,
    h("div", { class: "panel" }, h("h2", {}, "Warm pools"),
      h("table", { id: "pools" }, h("thead", {}, h("tr", {}, ["Template", "Isolation", "Target", "Ready", "Starting", "Fill", "Members", ""].map((t) => h("th", {}, t)))), poolRows),
      progress, admin ? poolForm() : h("div", { class: "row" }, h("button", { onclick: loadPools }, "Refresh"))),
    h("div", { class: "panel" }, h("h2", {}, "Templates"),
      h("table", { id: "templates" }, h("thead", {}, h("tr", {}, ["Name", "Kind", "Description", "Created", ""].map((t) => h("th", {}, t)))), templateRows),
      admin ? buildForm() : null));

  function renderPools(pools) {
    patchRows(poolRows, pools.length ? pools.map((p) => {
      const ready = p.target ? Math.min(100, (100 * p.ready) / p.target) : 100;
      const starting = p.target ? Math.min(100 - ready, (100 * p.starting) / p.target) : 0;
      return h("tr", { dataset: { template: p.template, key: `${p.template} ${p.isolation}` } },
        h("td", {}, p.template), h("td", {}, p.isolation), h("td", {}, p.target), h("td", {}, p.ready), h("td", {}, p.starting),
        h("td", {}, h("div", { class: "bar", title: `${p.ready}/${p.target} ready` },
          h("span", { class: "ready", dataset: { pct: ready } }), h("span", { class: "starting", dataset: { pct: starting } }))),
        h("td", {}, `${p.memory_mb} MiB · ${p.cpus} CPU`),
        h("td", {}, admin ? h("div", { class: "row" },
          h("button", { onclick: () => fill(p) }, "Fill now"),
          h("button", { class: "danger", onclick: () => { if (confirm(`Delete the pool of ${p.template} (${p.isolation}) and kill its members?`)) attempt(msg, () => del(`/v1/pools/${encodeURIComponent(p.template)}`, { isolation: p.isolation }), "pool deleted").then(loadPools); } }, "Delete")) : null));
    }) : [h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No warm pools."))]);
    // widths through the CSSOM: the policy allows no inline style attributes
    for (const span of poolRows.querySelectorAll(".bar span")) span.style.width = `${span.dataset.pct}%`;
  }

  async function loadPools() {
    const r = await attempt(msg, () => get("/v1/pools"));
    if (r) renderPools(r.pools);
  }
  async function loadTemplates() {
    const r = await attempt(msg, () => get("/v1/templates"));
    if (!r) return;
    replace(templateRows, r.templates.map((t) => h("tr", {},
      h("td", { class: "mono" }, t.name), h("td", {}, t.kind + (t.memory ? " + memory" : "")), h("td", {}, t.description), h("td", {}, when(t.created_at)),
      h("td", {}, (admin || t.kind === "snapshot") ? h("button", { class: "danger", onclick: () => { if (confirm(`Delete template ${t.name}?`)) attempt(msg, () => del(`/v1/templates/${encodeURIComponent(t.name)}`), `deleted ${t.name}`).then(loadTemplates); } }, "Delete") : null))));
  }

  async function fill(p) {
    replace(progress, h("div", { class: "muted" }, `Filling ${p.template} (${p.isolation})…`));
    const line = h("div", { class: "mono", id: "fill-line" });
    progress.append(line);
    await attempt(msg, () => stream("POST", `/v1/pools/${encodeURIComponent(p.template)}/fill`, (info) => {
      line.textContent = `${info.ready}/${info.target} ready, ${info.starting} starting`;
    }, { query: { isolation: p.isolation } }), `pool ${p.template} filled`);
    loadPools();
  }

  function poolForm() {
    const template = h("input", { placeholder: "template", id: "pool-template", size: 16 });
    const isolation = h("input", { placeholder: "isolation (default)", id: "pool-isolation", size: 14 });
    const size = h("input", { type: "number", min: 0, value: 1, id: "pool-size", size: 4 });
    const form = h("form", { class: "row" }, h("strong", {}, "Set pool"), template, isolation, h("label", {}, "size"), size,
      h("button", { class: "primary", type: "submit" }, "Save"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const body = { template: template.value.trim(), size: Number(size.value) };
      if (isolation.value.trim()) body.isolation = isolation.value.trim();
      attempt(msg, () => put("/v1/pools", body), (p) => `pool ${p.template} (${p.isolation}) keeps ${p.target}`).then(loadPools);
    });
    return form;
  }

  function buildForm() {
    const name = h("input", { placeholder: "name", id: "build-name", size: 16 });
    const source = h("input", { placeholder: "source: image ref, directory, tarball or debootstrap:SUITE", id: "build-source", size: 44 });
    const steps = h("textarea", { placeholder: "one shell step per line", id: "build-steps", rows: 3, cols: 60 });
    const log = h("pre", { class: "output", id: "build-log" });
    const status = h("div", { class: "mono", id: "build-status" });
    const form = h("form", {}, h("h2", {}, "Build a template"),
      h("div", { class: "row" }, name, source), h("div", { class: "row" }, steps, h("button", { class: "primary", type: "submit" }, "Build")), status, log);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      replace(log);
      replace(status, "starting…");
      const body = { name: name.value.trim(), source: source.value.trim(), steps: steps.value.split("\n").map((s) => s.trim()).filter(Boolean) };
      attempt(msg, () => stream("POST", "/v1/templates/build", (ev) => {
        if (ev.kind === "log") log.append(ev.data || "");
        else {
          const where = ev.step ? ` step ${ev.step}/${ev.total_steps}` : "";
          replace(status, `${ev.kind}${where}: ${ev.message || ""}${ev.cached ? " (cached)" : ""}`);
          log.append(h("span", { class: "muted" }, `[${ev.kind}${where}] ${ev.message || ""}${ev.cached ? " (cached)" : ""}\n`));
        }
      }, { body }), `template ${body.name} built`).then(loadTemplates);
    });
    return form;
  }

  loadPools();
  loadTemplates();
  if (!admin) return null;
  return liveEvents((event) => { if (event.pools) renderPools(event.pools); }, (on) => live.classList.toggle("on", on), (e) => msg.error(e));
}
