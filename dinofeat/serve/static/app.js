// The page of `dinofeat serve`: plain JavaScript over the JSON API (docs/serve.md).
"use strict";

const $ = (sel) => document.querySelector(sel);
let info = null;
let searchToken = 0;
let dupToken = 0;
let histogram = null;
const objectUrls = [];

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
}
function clearError() { $("#error").hidden = true; $("#error").textContent = ""; }

async function api(path, options) {
  let resp;
  try {
    resp = await fetch(path, options);
  } catch (e) {
    throw new Error("the server did not answer (" + e.message + ")");
  }
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try { message = (await resp.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return resp;
}

function baseName(path) { return path ? path.split(/[\\/]/).pop() : "(no file)"; }

function releaseUrls() { while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop()); }

// ------------------------------------------------------------------ search
function makeCard(item, text, title) {
  const li = $("#card").content.firstElementChild.cloneNode(true);
  const img = li.querySelector("img");
  img.src = "/api/image/" + item.id + "?size=256";
  img.alt = baseName(item.path);
  li.querySelector(".score").textContent = text;
  li.querySelector(".name").textContent = (item.label !== undefined ? item.label + " · " : "") +
    baseName(item.path);
  li.querySelector("button").title = title || item.path || "";
  li.dataset.id = item.id;
  return li;
}

async function attentionInto(img, body) {
  try {
    const resp = await api("/api/attention", { method: "POST", body });
    const url = URL.createObjectURL(await resp.blob());
    objectUrls.push(url);
    img.src = url;
  } catch (e) { img.title = "attention: " + e.message; }
}

async function search(form, previewSrc) {
  const token = ++searchToken;
  clearError();
  const k = $("#k").value || "10";
  form.set("k", k);
  $("#search-status").textContent = "searching…";
  const q = $("#query-img");
  q.src = previewSrc; q.hidden = false; $("#drop-text").hidden = true;
  let data;
  try {
    data = await (await api("/api/search", { method: "POST", body: form })).json();
  } catch (e) {
    if (token === searchToken) { showError(e.message); $("#search-status").textContent = ""; }
    return;
  }
  if (token !== searchToken) return;
  releaseUrls();
  const list = $("#results");
  list.replaceChildren();
  const scoreName = data.metric === "cosine" ? "" : "dist ";
  for (const r of data.results) {
    const li = makeCard(r, scoreName + r.score.toFixed(3),
                        (r.path || "") + " — click to search with this image");
    li.querySelector("button").addEventListener("click", () => searchById(r.id));
    list.append(li);
  }
  $("#search-status").textContent = data.results.length + " results in " +
    Math.round(data.ms) + " ms (" + data.model + ")";
  if ($("#show-attention").checked && info && info.attention) {
    const queryBody = new FormData();
    if (form.get("image")) queryBody.set("image", form.get("image"));
    else queryBody.set("id", form.get("id"));
    attentionInto(q, queryBody);
    for (const li of list.children) {
      const body = new FormData();
      body.set("id", li.dataset.id);
      attentionInto(li.querySelector("img"), body);
    }
  }
}

function searchFile(file) {
  if (!file) return;
  if (info && file.size > info.max_upload_mb * 1024 * 1024) {
    showError(file.name + ": " + (file.size / 1048576).toFixed(1) + " MB is larger than " +
              "the server's limit of " + info.max_upload_mb + " MB");
    return;
  }
  const form = new FormData();
  form.set("image", file, file.name);
  const url = URL.createObjectURL(file);
  search(form, url);
}

function searchById(id) {
  const form = new FormData();
  form.set("id", String(id));
  search(form, "/api/image/" + id + "?size=256");
}

// ------------------------------------------------------------------ duplicates
function drawHistogram() {
  const canvas = $("#histogram");
  const rect = canvas.getBoundingClientRect();
  canvas.width = Math.max(200, Math.round(rect.width));
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  if (!histogram) return;
  const { edges, counts } = histogram;
  let first = counts.findIndex((c) => c > 0);
  if (first < 0) first = 0;
  const lo = Math.min(0, edges[first]), hi = 1;
  const x = (v) => ((v - lo) / (hi - lo)) * (W - 20) + 10;
  const top = Math.max(1, ...counts);
  ctx.fillStyle = "#7a93d6";
  for (let i = 0; i < counts.length; i++) {
    if (edges[i + 1] <= lo || !counts[i]) continue;
    const h = Math.max(1, Math.sqrt(counts[i] / top) * (H - 22));  // sqrt: small bins stay visible
    ctx.fillRect(x(edges[i]), H - 14 - h, Math.max(1, x(edges[i + 1]) - x(edges[i]) - 1), h);
  }
  ctx.fillStyle = "#5f6368";
  ctx.font = "11px system-ui, sans-serif";
  for (const t of [lo, (lo + hi) / 2, hi]) ctx.fillText(t.toFixed(2), x(t) - 10, H - 2);
  const th = parseFloat($("#threshold").value);
  ctx.strokeStyle = "#b3261e";
  ctx.lineWidth = 2;
  ctx.beginPath(); ctx.moveTo(x(th), 0); ctx.lineTo(x(th), H - 14); ctx.stroke();
}

async function loadHistogram() {
  try {
    histogram = await (await api("/api/histogram")).json();
    drawHistogram();
  } catch (e) { showError("histogram: " + e.message); }
}

async function loadDuplicates() {
  const token = ++dupToken;
  const th = $("#threshold").value;
  $("#dup-status").textContent = "grouping at " + th + "…";
  let data;
  try {
    data = await (await api("/api/duplicates?threshold=" + encodeURIComponent(th))).json();
  } catch (e) {
    if (token === dupToken) { showError(e.message); $("#dup-status").textContent = ""; }
    return;
  }
  if (token !== dupToken) return;
  clearError();
  $("#dup-status").textContent = data.groups_count + " groups, " + data.duplicates_count +
    " images that duplicate another, among " + data.items + " at similarity ≥ " + data.threshold +
    (data.groups.length < data.groups_count ? " (first " + data.groups.length + " shown)" : "");
  const list = $("#groups");
  list.replaceChildren();
  data.groups.forEach((g, n) => {
    const li = document.createElement("li");
    const h = document.createElement("h2");
    h.textContent = "Group " + (n + 1) + ": " + g.members.length + " images";
    const grid = document.createElement("ol");
    grid.className = "grid";
    g.members.forEach((m, i) => {
      const card = makeCard(m, (i === 0 ? "keep · " : "") + m.similarity.toFixed(3),
                            (m.path || "") + " — click to search with this image");
      if (i === 0) card.classList.add("keep");
      card.querySelector("button").addEventListener("click", () => {
        selectTab("search"); searchById(m.id);
      });
      grid.append(card);
    });
    li.append(h, grid);
    list.append(li);
  });
}

// ------------------------------------------------------------------ tabs and keys
function selectTab(name) {
  for (const [tab, view] of [["#tab-search", "#view-search"], ["#tab-dups", "#view-dups"]]) {
    const on = tab === "#tab-" + name;
    $(tab).setAttribute("aria-selected", on ? "true" : "false");
    $(tab).tabIndex = on ? 0 : -1;
    $(view).hidden = !on;
  }
  if (name === "dups") {
    if (!histogram) loadHistogram(); else drawHistogram();
    loadDuplicates();
  }
}

function gridKeys(event) {
  // Arrow keys move between the cards of a grid, by column and by row.
  const btn = event.target.closest(".card button");
  if (!btn) return;
  const grid = btn.closest(".grid");
  const buttons = [...grid.querySelectorAll(".card button")];
  const i = buttons.indexOf(btn);
  const cols = Math.max(1, Math.round(grid.clientWidth / btn.offsetWidth));
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols }[event.key];
  if (step === undefined) return;
  const next = buttons[i + step];
  if (next) { next.focus(); event.preventDefault(); }
}

async function init() {
  $("#tab-search").addEventListener("click", () => selectTab("search"));
  $("#tab-dups").addEventListener("click", () => selectTab("dups"));
  $("nav").addEventListener("keydown", (e) => {
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      const next = $("#tab-search").getAttribute("aria-selected") === "true" ? "dups" : "search";
      selectTab(next); $("#tab-" + next).focus();
    }
  });
  const drop = $("#drop");
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#file").click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    searchFile(e.dataTransfer.files[0]);
  });
  $("#file").addEventListener("change", (e) => { searchFile(e.target.files[0]); e.target.value = ""; });
  $("#results").addEventListener("keydown", gridKeys);
  $("#groups").addEventListener("keydown", gridKeys);
  const slider = $("#threshold");
  let timer = null;
  slider.addEventListener("input", () => {
    $("#threshold-value").textContent = parseFloat(slider.value).toFixed(2);
    drawHistogram();
    clearTimeout(timer);
    timer = setTimeout(loadDuplicates, 300);
  });
  window.addEventListener("resize", drawHistogram);
  try {
    info = await (await api("/api/info")).json();
  } catch (e) { showError(e.message); return; }
  $("#index-info").textContent = info.items + " images · " + info.model + " · " + info.metric +
    " · " + info.index;
  $("#index-info").title = $("#index-info").textContent;
  $("#k").max = String(info.max_k);
  if (!info.attention) {
    $("#show-attention").disabled = true;
    $("#show-attention").parentElement.title = "this model has no attention maps (not a ViT)";
  }
  slider.value = String(info.default_threshold);
  $("#threshold-value").textContent = info.default_threshold.toFixed(2);
  document.body.dataset.ready = "1";
}

init();
