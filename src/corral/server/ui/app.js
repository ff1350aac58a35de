// Corral dashboard: a hash-routed single page over the public API (api.js). No framework, no bundler.
import { session, whoIs } from "./api.js";
import { h, replace } from "./dom.js";
import { sandboxesView } from "./views/sandboxes.js";
import { sandboxView } from "./views/sandbox.js";
import { poolsView } from "./views/pools.js";
import { metricsView } from "./views/metrics.js";
import { adminView } from "./views/admin.js";

const root = document.getElementById("app");
let current = null; // the mounted view's cleanup function
let signInMessage = null;

const TENANT_NAV = [["#/sandboxes", "Sandboxes"], ["#/pools", "Pools & templates"], ["#/metrics", "Metrics"]];
const ADMIN_NAV = [
  ["#/tenants", "Tenants & keys"], ["#/audit", "Audit log"], ["#/pools", "Pools & templates"], ["#/metrics", "Metrics"],
];

session.onSignedOut((error) => {
  signInMessage = error ? error.message : null;
  if (location.hash !== "#/signin") location.hash = "#/signin";
  else render();
});

function signIn() {
  const input = h("input", {
    type: "password", id: "api-key", name: "api-key", autocomplete: "off", spellcheck: "false",
    placeholder: "corral_key-…", "aria-label": "API key",
  });
  const status = h("div");
  if (signInMessage) replace(status, h("div", { class: "error", role: "alert" }, signInMessage));
  const form = h("form", { class: "panel signin", id: "signin" },
    h("h1", {}, "Corral"),
    h("p", { class: "muted" }, "Sign in with an API key. Tenant keys see their sandboxes; admin keys see tenants, keys, quotas and the audit log. The key stays in this tab only."),
    status,
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { class: "primary", type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    try {
      const role = await whoIs(key);
      session.set(key, role);
      signInMessage = null;
      location.hash = role === "admin" ? "#/tenants" : "#/sandboxes";
    } catch (error) {
      replace(status, h("div", { class: "error", role: "alert" }, error.message));
    }
  });
  replace(root, form);
  input.focus();
}

function shell(active) {
  const nav = session.role === "admin" ? ADMIN_NAV : TENANT_NAV;
  const main = h("main", { id: "view" });
  replace(root,
    h("header", { class: "top" },
      h("span", { class: "brand" }, "Corral"),
      h("nav", {}, nav.map(([href, label]) =>
        h("a", { href, class: active.startsWith(href) ? "active" : "" }, label))),
      h("span", { class: "who", id: "who" }, session.role === "admin" ? "admin key" : "tenant key",
        h("button", { id: "signout", onclick: () => { session.clear(); signInMessage = null; location.hash = "#/signin"; } }, "Sign out")),
    ),
    main);
  return main;
}

function render() {
  if (current) { current(); current = null; }
  const hash = location.hash || "#/";
  if (!session.key || hash === "#/signin") {
    if (session.key && hash === "#/signin") session.clear();
    signIn();
    return;
  }
  const admin = session.role === "admin";
  const [, page, arg] = hash.split("/");
  const main = shell("#/" + (page || ""));
  const views = {
    sandboxes: () => sandboxesView(main),
    sandbox: () => sandboxView(main, decodeURIComponent(arg || "")),
    pools: () => poolsView(main),
    metrics: () => metricsView(main),
    tenants: () => adminView(main, "tenants"),
    audit: () => adminView(main, "audit"),
  };
  const pick = views[page] || (() => { location.replace(admin ? "#/tenants" : "#/sandboxes"); return null; });
  current = pick() || null;
}

window.addEventListener("hashchange", render);
render();
