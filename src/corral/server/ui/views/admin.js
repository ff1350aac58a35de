// Admin keys: tenants with their quotas, API keys (make one: shown once; revoke), and the audit log.
import { del, get, post, put, stream } from "../api.js";
import { h, replace, when } from "../dom.js";
import { attempt, messages } from "./common.js";

export function adminView(main, page) {
  const msg = messages();
  if (page === "audit") return auditPage(main, msg);
  const tenantRows = h("tbody", { id: "tenant-rows" });
  const keyRows = h("tbody", { id: "key-rows" });
  const shown = h("div", { id: "new-key" });
  const name = h("input", { id: "tenant-name", placeholder: "tenant name", size: 20 });
  const tenantForm = h("form", { class: "row" }, name, h("button", { class: "primary", type: "submit" }, "Create tenant"));
  replace(main, h("h1", {}, "Tenants & keys"), msg.el, shown,
    h("div", { class: "panel" }, h("h2", {}, "Tenants"), tenantForm,
      h("table", { id: "tenants" }, h("thead", {}, h("tr", {}, ["Tenant", "Id", "Max sandboxes", "Max memory (MiB)", "Max timeout (s)", "Created", ""].map((t) => h("th", {}, t)))), tenantRows)),
    h("div", { class: "panel" }, h("h2", {}, "API keys"),
      h("table", { id: "keys" }, h("thead", {}, h("tr", {}, ["Key", "Tenant", "Name", "Created", "Revoked", ""].map((t) => h("th", {}, t)))), keyRows)));
  let tenants = [];
  const quota = (v) => (v === null || v === undefined ? "unlimited" : String(v));

  async function load() {
    const [t, k] = await Promise.all([attempt(msg, () => get("/v1/tenants")), attempt(msg, () => get("/v1/keys"))]);
    if (t) {
      tenants = t.tenants;
      replace(tenantRows, tenants.map((x) => h("tr", { dataset: { tenant: x.name } },
        h("td", {}, x.name), h("td", { class: "mono" }, x.tenant_id),
        h("td", {}, quota(x.quotas.max_sandboxes)), h("td", {}, quota(x.quotas.max_memory_mb)), h("td", {}, quota(x.quotas.max_timeout)),
        h("td", {}, when(x.created_at)),
        h("td", {}, h("div", { class: "row" },
          h("button", { onclick: () => makeKey(x) }, "New key"),
          h("button", { onclick: () => editQuotas(x) }, "Quotas"))))));
    }
    if (k) {
      const names = Object.fromEntries(tenants.map((x) => [x.tenant_id, x.name]));
      replace(keyRows, k.keys.map((key) => h("tr", { dataset: { key: key.key_id } },
        h("td", { class: "mono" }, key.key_id), h("td", {}, key.admin ? "admin" : names[key.tenant_id] || key.tenant_id),
        h("td", {}, key.name), h("td", {}, when(key.created_at)), h("td", {}, when(key.revoked_at)),
        h("td", {}, key.revoked_at ? null : h("button", { class: "danger", onclick: () => { if (confirm(`Revoke ${key.key_id}? Whoever uses it is signed out.`)) attempt(msg, () => del(`/v1/keys/${encodeURIComponent(key.key_id)}`), `revoked ${key.key_id}`).then(load); } }, "Revoke")))));
    }
  }
  async function makeKey(tenant) {
    const label = prompt(`A name for the new key of ${tenant.name}:`, "dashboard");
    if (label === null) return;
    const made = await attempt(msg, () => post(`/v1/tenants/${encodeURIComponent(tenant.name)}/keys`, { name: label }));
    if (!made) return;
    replace(shown, h("div", { class: "notice" }, `New key for ${tenant.name} (shown once, copy it now): `, h("span", { class: "mono", id: "new-key-value" }, made.key)));
    load();
  }
  async function editQuotas(tenant) {
    const text = prompt(`Quotas of ${tenant.name} as JSON (omit a field for unlimited):`, JSON.stringify(tenant.quotas));
    if (text === null) return;
    let body;
    try { body = Object.fromEntries(Object.entries(JSON.parse(text)).filter(([, v]) => v !== null)); } catch (e) { msg.error(new Error(`not JSON: ${e.message}`)); return; }
    attempt(msg, () => put(`/v1/tenants/${encodeURIComponent(tenant.name)}/quotas`, body), `quotas of ${tenant.name} saved`).then(load);
  }
  tenantForm.addEventListener("submit", (e) => {
    e.preventDefault();
    attempt(msg, () => post("/v1/tenants", { name: name.value.trim() }), (t) => `tenant ${t.name} created`).then(load);
  });
  load();
  return null;
}

function auditPage(main, msg) {
  const rows = h("tbody", { id: "audit-rows" });
  const filter = h("input", { type: "search", id: "audit-filter", placeholder: "filter: action, tenant, sandbox…", size: 34 });
  const verified = h("span", { id: "audit-verify" });
  let entries = [];
  replace(main, h("h1", {}, "Audit log"), msg.el,
    h("div", { class: "panel" },
      h("div", { class: "row" }, filter, h("button", { onclick: load }, "Reload"), h("button", { onclick: verify }, "Verify chain"), verified),
      h("table", { id: "audit" }, h("thead", {}, h("tr", {}, ["#", "When", "Action", "Tenant", "Sandbox", "Details"].map((t) => h("th", {}, t)))), rows)));
  function render() {
    const q = filter.value.trim().toLowerCase();
    const shown = entries.filter((e) => !q || JSON.stringify(e).toLowerCase().includes(q)).slice(-500).reverse();
    replace(rows, shown.map((e) => h("tr", {}, h("td", {}, e.seq), h("td", {}, when(e.at)), h("td", {}, e.action),
      h("td", { class: "mono" }, e.tenant_id || ""), h("td", { class: "mono" }, e.sandbox_id || ""), h("td", { class: "mono" }, JSON.stringify(e.details)))));
  }
  async function load() {
    const got = [];
    const ok = await attempt(msg, () => stream("GET", "/v1/audit", (e) => got.push(e)).then(() => true));
    if (ok) { entries = got; render(); }
  }
  async function verify() {
    const r = await attempt(msg, () => get("/v1/audit/verify"));
    if (r) replace(verified, r.ok ? `chain intact: ${r.entries} entries, head ${r.head_hash.slice(0, 12)}…` : `BROKEN at entry ${r.first_bad_seq}: ${r.problem}`);
  }
  filter.addEventListener("input", render);
  load();
  return null;
}
