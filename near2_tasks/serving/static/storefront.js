// The near2 storefront page: plain JavaScript over the JSON API (/served, /search).
// Catalog text is untrusted: it is only ever written with textContent, never as HTML.
"use strict";

const FILTERS = ["category", "brand", "price_min", "price_max"];
let served = null;  // the last /served answer

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function ms(value) {
  return value === undefined || value === null ? "?" : `${Number(value).toFixed(1)} ms`;
}

function bytes(value) {
  return `${Number(value).toFixed(Number.isInteger(value) ? 0 : 1)} B`;
}

class ApiError extends Error {
  constructor(message, status, hint) { super(message); this.status = status; this.hint = hint; }
}

async function getJSON(path, params) {
  const url = params ? `${path}?${params}` : path;
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch (err) {
    throw new ApiError("the storefront service does not answer", 0);
  }
  let body = null;
  try { body = await response.json(); } catch (err) { /* not JSON: reported by status below */ }
  if (!response.ok) {
    throw new ApiError((body && body.error) || `HTTP ${response.status}`, response.status, body && body.hint);
  }
  return body;
}

function showStatus(err) {
  const status = $("status");
  const unavailable = err.status === 503 || err.status === 0;
  const text = unavailable ? `Search is unavailable: ${err.message}.` : `Search failed: ${err.message}.`;
  status.textContent = err.hint ? `${text} ${err.hint}` : text;
  status.dataset.kind = unavailable ? "unavailable" : "bad-request";
  status.hidden = false;
}

function clearStatus() {
  const status = $("status");
  status.hidden = true;
  status.textContent = "";
  delete status.dataset.kind;
}

function fieldOf(dim) {
  return served.fields.find((f) => f.dim === dim);
}

async function loadServed() {
  served = await getJSON("/served");
  const dimSelect = $("dim");
  const chosenDim = dimSelect.value || new URLSearchParams(location.search).get("dim");
  dimSelect.replaceChildren(...served.dims.map((d) => {
    const option = el("option", `${d}-d (${bytes(fieldOf(d).bytes_per_product)} per product)`);
    option.value = String(d);
    return option;
  }));
  dimSelect.value = served.dims.includes(Number(chosenDim)) ? String(chosenDim) : String(served.default_dim);
  const modeSelect = $("mode");
  const chosenMode = modeSelect.value || new URLSearchParams(location.search).get("mode");
  modeSelect.replaceChildren(...served.modes.map((m) => {
    const option = el("option", m);
    option.value = m;
    return option;
  }));
  modeSelect.value = served.modes.includes(chosenMode) ? chosenMode : served.default_mode;
  const fusionSelect = $("fusion");
  const chosenFusion = fusionSelect.value || new URLSearchParams(location.search).get("fusion");
  fusionSelect.replaceChildren(...(served.fusions || []).map((f) => {
    const option = el("option", f);
    option.value = f;
    return option;
  }));
  fusionSelect.value = (served.fusions || []).includes(chosenFusion) ? chosenFusion : served.default_fusion;
  const syncFusion = () => { fusionSelect.disabled = modeSelect.value !== "hybrid"; };
  modeSelect.onchange = syncFusion;
  syncFusion();
  $("served").textContent = `Model ${served.model_name ?? "?"} v${served.model_version ?? "?"} · index ${served.index}`
    + ` (alias ${served.alias}) · dims ${served.dims.join(", ")}`;
}

function searchParams(overrides) {
  const params = new URLSearchParams();
  params.set("q", $("q").value.trim());
  params.set("k", $("k").value || "10");
  params.set("dim", $("dim").value);
  params.set("mode", $("mode").value);
  if ($("mode").value === "hybrid" && $("fusion").value) params.set("fusion", $("fusion").value);
  for (const name of FILTERS) {
    const value = $(name).value.trim();
    if (value !== "") params.set(name, value);
  }
  for (const [name, value] of Object.entries(overrides || {})) params.set(name, value);
  if (params.get("mode") !== "hybrid") params.delete("fusion");
  return params;
}

function answeredBy(body) {
  const field = fieldOf(body.dim);
  const funnel = body.mode === "funnel"
    ? ` (shortlist of ${body.shortlist_size} at ${body.shortlist_dim}-d, rescored at ${body.dim}-d)` : "";
  const h = body.hybrid;
  const fused = h ? ` (BM25 + kNN, ${h.fusion === "rrf" ? `RRF k=${h.rrf_k}`
    : `linear, dense weight ${Number(h.weight).toFixed(2)} from ${h.weight_source}`}; `
    + `${h.lexical_hits} BM25 and ${h.dense_hits} kNN candidates)` : "";
  return `${body.hits.length} results at ${body.dim}-d, ${body.mode}${funnel}${fused} · `
    + `${ms(body.timings_ms.total)} (search ${ms(body.timings_ms.search)}, encode ${ms(body.timings_ms.encode)}) · `
    + `${field ? bytes(field.bytes_per_product) : "?"} per product · `
    + `answered by model ${body.model_name ?? "?"} v${body.model_version ?? "?"}, index ${body.index}`;
}

function resultRow(hit, rank) {
  const row = el("tr");
  row.append(el("td", rank), el("td", hit.title, "title"), el("td", hit.brand ?? ""), el("td", hit.category ?? ""),
    el("td", hit.price === null || hit.price === undefined ? "" : Number(hit.price).toFixed(2), "num"),
    el("td", Number(hit.score).toFixed(4), "num score"));
  row.dataset.productId = hit.product_id;
  return row;
}

async function ensureServed() {
  if (served === null) await loadServed();
}

async function runSearch() {
  if (!$("q").value.trim()) { $("q").focus(); return; }
  try {
    await ensureServed();
    const params = searchParams();
    history.replaceState(null, "", `/?${params}`);
    const body = await getJSON("/search", params);
    clearStatus();
    const section = $("results-section");
    $("answered-by").textContent = answeredBy(body);
    section.dataset.dim = String(body.dim);
    section.dataset.latencyMs = String(body.timings_ms.total);
    $("results").tBodies[0].replaceChildren(...body.hits.map((hit, i) => resultRow(hit, i + 1)));
    section.hidden = false;
  } catch (err) {
    showStatus(err);
  }
}

function compareColumn(dim) {
  const column = el("section", null, "column");
  column.dataset.dim = String(dim);
  column.setAttribute("aria-label", `${dim} dimensions`);
  column.append(el("h3", `${dim}-d`));
  return column;
}

function fillColumn(column, body) {
  const field = fieldOf(body.dim);
  const facts = el("p", `${ms(body.timings_ms.total)} (search ${ms(body.timings_ms.search)}) · `
    + `${bytes(field.bytes_per_product)} per product (${field.index_type})`, "facts");
  column.dataset.latencyMs = String(body.timings_ms.total);
  column.dataset.bytesPerProduct = String(field.bytes_per_product);
  const list = el("ol");
  for (const hit of body.hits) {
    const item = el("li");
    item.dataset.productId = hit.product_id;
    item.append(el("span", hit.title, "title"), el("br"),
      el("span", [hit.brand, hit.category, hit.price === null || hit.price === undefined ? null
        : Number(hit.price).toFixed(2), `score ${Number(hit.score).toFixed(4)}`].filter((x) => x).join(" · "), "muted"));
    list.append(item);
  }
  column.append(facts, list);
}

async function runCompare() {
  if (!$("q").value.trim()) { $("q").focus(); return; }
  try {
    await ensureServed();
    history.replaceState(null, "", `/?${searchParams({ compare: "1" })}`);
    const grid = $("compare");
    const columns = served.dims.map(compareColumn);
    grid.replaceChildren(...columns);
    $("compare-section").hidden = false;
    let last = null;
    for (const column of columns) {  // one at a time, so the latencies do not compete for the CPU
      const body = await getJSON("/search", searchParams({ dim: column.dataset.dim, mode: "knn" }));
      fillColumn(column, body);
      last = body;
    }
    clearStatus();
    $("compare-answered-by").textContent = `"${last.query}" · answered by model ${last.model_name ?? "?"} `
      + `v${last.model_version ?? "?"}, index ${last.index}`;
    $("compare-section").dataset.complete = "true";
  } catch (err) {
    showStatus(err);
  }
}

function restoreFromUrl() {
  const params = new URLSearchParams(location.search);
  for (const name of ["q", "k", ...FILTERS]) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  return params;
}

document.addEventListener("DOMContentLoaded", async () => {
  $("search-form").addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });
  $("compare-button").addEventListener("click", runCompare);
  const params = restoreFromUrl();
  try {
    await loadServed();
  } catch (err) {
    $("served").textContent = "Nothing is being served right now.";
    showStatus(err);
    return;
  }
  document.body.dataset.ready = "true";
  if (params.get("q")) await (params.get("compare") === "1" ? runCompare() : runSearch());
});
