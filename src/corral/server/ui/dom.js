// Tiny DOM helpers. Text always goes in as text (textContent), never as HTML: nothing a sandbox or a user
// controls (names, metadata, file names, output) can become markup or script in the dashboard.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// Rows that carry data-key are patched, not rebuilt: a row, and each cell of it, stays the same element while
// it renders the same. A server push then never swaps a button out from under the pointer (a press and a
// release on two different elements is no click), nor drops the text a user is selecting. A kept element keeps
// its attributes and listeners, so a row's own attributes and handlers may depend on its key only, and a
// cell's handlers only on what the cell shows.
export function patchRows(tbody, rows) {
  const old = new Map([...tbody.children].filter((tr) => tr.dataset.key).map((tr) => [tr.dataset.key, tr]));
  const next = rows.map((tr) => {
    const was = tr.dataset.key ? old.get(tr.dataset.key) : undefined;
    if (!was || was.cells.length !== tr.cells.length) return tr;
    [...tr.cells].forEach((cell, i) => { if (!cell.isEqualNode(was.cells[i])) was.cells[i].replaceWith(cell); });
    return was;
  });
  const keep = new Set(next);
  for (const tr of [...tbody.children]) if (!keep.has(tr)) tr.remove();
  next.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
  return tbody;
}

export function ago(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function when(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toLocaleString() : "";
}

export const now = () => Date.now() / 1000;
