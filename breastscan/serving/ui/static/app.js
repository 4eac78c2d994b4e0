/* breastscan web UI: calls the service's own public HTTP API (same origin), nothing else.
 *
 *   POST /models   -> the served models (table at the bottom)
 *   POST /preview  -> the decoded image as an 8-bit PNG (DICOM and 16-bit files too)
 *   POST /analyze  -> every model of the image's modality (+ the 8-category view)
 *
 * The page lives at <service>/ui/, so the API is one level up ("../analyze"), which also
 * works behind a reverse proxy that serves the service under a path prefix.
 *
 * API key: when the service requires one, its first 401 answer shows the header's key field
 * (hidden until then, or while no key is kept) and asks for the key, which is then sent as
 * "X-API-Key" with every call. It is kept in sessionStorage (this tab, until it closes),
 * never in localStorage or a cookie.
 */
(function () {
  "use strict";

  const API_BASE = new URL("../", document.baseURI);
  const MIN_ROI_PX = 2;          // a drag smaller than this (image pixels) is a click
  const MAX_BACKING_PX = 4096;   // canvas backing store cap (huge mammograms)
  const KEY_STORE = "breastscan.apiKey";  // sessionStorage only
  const NEEDS_KEY = "This service needs an API key: enter it above.";
  const WRONG_KEY = "This API key was not accepted: enter a valid one above.";

  const $ = (sel) => document.querySelector(sel);
  const els = {
    form: $("#form"), file: $("#file"), modality: $("#modality"), modalityHint: $("#modality-hint"),
    explain: $("#explain"), analyze: $("#analyze"), busy: $("#busy"), busyText: $("#busy-text"),
    viewer: $("#viewer"), viewerEmpty: $("#viewer-empty"), canvas: $("#canvas"),
    imageInfo: $("#image-info"), roi: $("#roi"), clearRoi: $("#clear-roi"),
    error: $("#error"), errorMessage: $("#error-message"), results: $("#results"),
    models: $("#models"), keyForm: $("#key-form"), apiKey: $("#api-key"),
  };

  const state = {
    file: null,        // the chosen File
    preview: null,     // {width, height, modality} of the decoded image
    image: null,       // HTMLImageElement of the preview PNG
    roi: null,         // [x, y, w, h] in image pixels, or null
    drag: null,        // {a: [x, y], b: [x, y]} while dragging, image pixels
    models: {},        // /models by name
    busy: 0,
    previewSeq: 0,
    analyzing: false,
    modelsSeq: 0,
    key: "",           // the API key in use (sent as X-API-Key when not empty)
  };

  // ------------------------------------------------------------------ helpers

  /** Build an element: h("div", {class: "x", dataset: {a: 1}}, "text", child). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key === "text") el.textContent = value;
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const pct = (p, digits = 1) => `${(100 * Number(p)).toFixed(digits)} %`;
  const fmtInt = (n) => Number(n).toLocaleString("en-US");

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** The message of an error answer: {"error", "code"} or BentoML's {"error", "detail": [...]}. */
  function errorMessage(resp, data, text) {
    if (data && typeof data === "object") {
      let msg = "";
      if (typeof data.error === "string") msg = data.error;
      else if (data.error) msg = JSON.stringify(data.error);
      if (Array.isArray(data.detail) && data.detail.length) {
        const details = data.detail.map((d) => {
          if (d && typeof d === "object") {
            const where = Array.isArray(d.loc) ? `${d.loc.join(".")}: ` : "";
            return where + (d.msg || JSON.stringify(d));
          }
          return String(d);
        }).join("; ");
        msg = msg ? `${msg} (${details})` : details;
      } else if (!msg && typeof data.detail === "string") {
        msg = data.detail;
      }
      if (msg) return msg;
    }
    const snippet = (text || "").trim().slice(0, 300);
    return `The service answered HTTP ${resp.status}${resp.statusText ? " " + resp.statusText : ""}` +
      (snippet ? `: ${snippet}` : ".");
  }

  /** POST to an API endpoint; JSON (object) or multipart (FormData) body; JSON answer. */
  async function api(path, body) {
    const init = { method: "POST", headers: { Accept: "application/json" }, cache: "no-store" };
    const key = state.key;
    if (key) {
      if (!/^[\x21-\x7e]+$/.test(key)) {
        markKey(true);
        throw new ApiError("The API key holds characters no key has (spaces, or letters outside ASCII): " +
          "check it above.", 0, "unauthorized");
      }
      init.headers["X-API-Key"] = key;
    }
    if (body instanceof FormData) {
      init.body = body;
    } else {
      init.body = JSON.stringify(body || {});
      init.headers["Content-Type"] = "application/json";
    }
    let resp;
    try {
      resp = await fetch(new URL(path, API_BASE), init);
    } catch (exc) {
      throw new ApiError(`Could not reach the service (${exc.message || exc}).`, 0, "network");
    }
    const text = await resp.text();
    if (resp.status === 401) {
      markKey(true);
      throw new ApiError(key ? WRONG_KEY : NEEDS_KEY, 401, "unauthorized");
    }
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      const code = data && typeof data === "object" && typeof data.code === "string" ? data.code : null;
      throw new ApiError(errorMessage(resp, data, text), resp.status, code);
    }
    if (data === null) throw new ApiError("The service sent an answer that is not JSON.", resp.status, null);
    return data;
  }

  function showError(exc) {
    const msg = exc && exc.message ? exc.message : String(exc);
    const bits = [];
    if (exc && exc.status) bits.push(`HTTP ${exc.status}`);
    if (exc && exc.code) bits.push(exc.code);
    els.errorMessage.textContent = msg;
    const title = els.error.querySelector(".error-title");
    title.textContent = bits.length ? `Request failed (${bits.join(" · ")})` : "Cannot do that";
    els.error.dataset.code = (exc && exc.code) || "";
    els.error.hidden = false;
  }

  function hideError() {
    els.error.hidden = true;
    els.errorMessage.textContent = "";
    delete els.error.dataset.code;
  }

  function setBusy(on, text) {
    state.busy = Math.max(0, state.busy + (on ? 1 : -1));
    if (on && text) els.busyText.textContent = text;
    els.busy.hidden = state.busy === 0;
    document.body.classList.toggle("is-busy", state.busy > 0);
    updateButtons();
  }

  function updateButtons() {
    els.analyze.disabled = !state.file || state.analyzing;
    els.clearRoi.disabled = !state.roi && !els.roi.value.trim();
  }

  function placeholder(text) {
    els.results.replaceChildren(h("p", { class: "placeholder" }, text));
  }

  // ------------------------------------------------------------------ API key

  function storedKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (_) { /* storage off: the key lasts as long as the page */ }
  }

  /** Flag the key field (refused or missing key), showing it, or clear the flag. */
  function markKey(bad) {
    if (!bad) {
      els.apiKey.removeAttribute("aria-invalid");
      return;
    }
    els.apiKey.setAttribute("aria-invalid", "true");
    if (els.keyForm.hidden) {
      els.keyForm.hidden = false;
      if (document.activeElement === document.body) els.apiKey.focus();
    }
  }

  /** Use the key now in the field: store it, and redo what a refused key left undone. */
  function applyKey() {
    const key = els.apiKey.value.trim();
    if (key === state.key) return;
    state.key = key;
    storeKey(key);
    markKey(false);
    if (els.error.dataset.code === "unauthorized") hideError();
    loadModels();
    if (state.file && !state.preview && !state.busy) onFile(state.file);
  }

  els.keyForm.addEventListener("submit", (ev) => { ev.preventDefault(); applyKey(); });
  els.apiKey.addEventListener("change", applyKey);

  // ------------------------------------------------------------------ models table

  async function loadModels() {
    const tbody = els.models.tBodies[0];
    const seq = ++state.modelsSeq;
    if (!tbody.querySelector("tr.loading")) {
      tbody.replaceChildren(h("tr", { class: "loading" }, h("td", { colspan: 7 }, "Loading…")));
    }
    try {
      const list = await api("models", {});
      if (seq !== state.modelsSeq) return;
      state.models = {};
      const rows = list.map((m) => {
        state.models[m.name] = m;
        return h("tr", { dataset: { model: m.name } },
          h("th", { scope: "row" }, m.name),
          h("td", { class: "num", dataset: { field: "version" } }, m.version ?? "—"),
          h("td", { dataset: { field: "stage" } }, stageBadge(m.stage)),
          h("td", { dataset: { field: "task" } }, m.task),
          h("td", { dataset: { field: "modality" } }, m.modality),
          h("td", { dataset: { field: "classes" } }, (m.classes || []).join(", ")),
          h("td", { class: "mono", dataset: { field: "spec" }, title: m.source || "" }, m.spec_id || "—"));
      });
      tbody.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 7 }, "No models are served."))]));
      updateModalityHint();
    } catch (exc) {
      if (seq !== state.modelsSeq) return;
      tbody.replaceChildren(h("tr", { class: "failed" },
        h("td", { colspan: 7 }, `Could not load the models: ${exc.message}`)));
      showError(exc);
    }
  }

  function stageBadge(stage) {
    const known = ["production", "staging", "candidate", "archived"];
    const cls = known.includes(String(stage)) ? `stage-${stage}` : "stage-other";
    return h("span", { class: `badge stage ${cls}` }, stage ?? "unknown stage");
  }

  // ------------------------------------------------------------------ image + preview

  async function onFile(file) {
    state.file = file || null;
    state.preview = null;
    state.image = null;
    state.roi = null;
    state.drag = null;
    els.roi.value = "";
    els.roi.removeAttribute("aria-invalid");
    hideError();
    placeholder("Results appear here after Analyze.");
    els.canvas.hidden = true;
    els.viewerEmpty.hidden = false;
    els.viewerEmpty.textContent = file ? "Decoding the image…" : "Choose an image (or drop a file here) to see it.";
    els.imageInfo.textContent = "";
    updateModalityHint();
    updateButtons();
    if (!file) return;

    const seq = ++state.previewSeq;
    setBusy(true, "Decoding the image…");
    try {
      const form = new FormData();
      form.append("image", file, file.name || "image");
      const preview = await api("preview", form);
      const img = await loadImage(`data:image/png;base64,${preview.png}`);
      if (seq !== state.previewSeq) return;
      state.preview = { width: preview.width, height: preview.height, modality: preview.modality || null };
      state.image = img;
      els.viewerEmpty.hidden = true;
      els.canvas.hidden = false;
      layoutCanvas();
      els.imageInfo.textContent = `${file.name || "image"} — ${preview.width} × ${preview.height} px` +
        (preview.modality ? ` · DICOM header: ${preview.modality}` : "");
      updateModalityHint();
    } catch (exc) {
      if (seq !== state.previewSeq) return;
      els.viewerEmpty.textContent = "This file cannot be shown.";
      showError(exc);
    } finally {
      setBusy(false);
    }
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new ApiError("The preview image could not be decoded by the browser.", 0, null));
      img.src = src;
    });
  }

  function updateModalityHint() {
    const hint = els.modalityHint;
    const chosen = els.modality.value;
    const header = state.preview && state.preview.modality;
    hint.classList.remove("warn");
    els.modality.removeAttribute("aria-invalid");
    if (chosen === "auto") {
      if (header) {
        hint.textContent = `From the DICOM header: ${header}.`;
      } else if (state.preview) {
        hint.textContent = "This file does not name its modality: choose mammography or ultrasound.";
        hint.classList.add("warn");
        els.modality.setAttribute("aria-invalid", "true");
      } else {
        hint.textContent = "auto reads the modality from a DICOM file's header.";
      }
    } else if (header && header !== chosen) {
      hint.textContent = `Note: the DICOM header says ${header}.`;
      hint.classList.add("warn");
    } else {
      const names = Object.values(state.models).filter((m) => m.modality === chosen).map((m) => m.name);
      hint.textContent = names.length ? `Models: ${names.join(", ")}.` : "";
    }
  }

  // ------------------------------------------------------------------ canvas + ROI

  function layoutCanvas() {
    if (!state.preview) return;
    const { width: W, height: H } = state.preview;
    const style = getComputedStyle(els.viewer);
    const padX = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
    const boxW = Math.max(120, els.viewer.clientWidth - padX);
    const boxH = Math.max(200, Math.min(560, window.innerHeight * 0.62));
    const scale = Math.min(boxW / W, boxH / H, 4);
    const cssW = Math.max(1, Math.round(W * scale));
    const cssH = Math.max(1, Math.round(H * scale));
    els.canvas.style.width = `${cssW}px`;
    els.canvas.style.height = `${cssH}px`;
    const dpr = window.devicePixelRatio || 1;
    const k = Math.min(dpr, MAX_BACKING_PX / Math.max(cssW, cssH));
    els.canvas.width = Math.max(1, Math.round(cssW * k));
    els.canvas.height = Math.max(1, Math.round(cssH * k));
    draw();
  }

  function currentRect() {
    if (state.drag) return rectFromPoints(state.drag.a, state.drag.b);
    return state.roi;
  }

  function draw() {
    const canvas = els.canvas;
    if (!state.image || !state.preview) return;
    const ctx = canvas.getContext("2d");
    const cw = canvas.width, ch = canvas.height;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.clearRect(0, 0, cw, ch);
    ctx.drawImage(state.image, 0, 0, cw, ch);
    const r = currentRect();
    if (!r) return;
    const sx = cw / state.preview.width, sy = ch / state.preview.height;
    const x = r[0] * sx, y = r[1] * sy, w = r[2] * sx, hgt = r[3] * sy;
    ctx.fillStyle = "rgba(8, 12, 20, 0.55)";
    ctx.fillRect(0, 0, cw, y);
    ctx.fillRect(0, y + hgt, cw, ch - y - hgt);
    ctx.fillRect(0, y, x, hgt);
    ctx.fillRect(x + w, y, cw - x - w, hgt);
    const lw = Math.max(1, (window.devicePixelRatio || 1) * 1.5);
    ctx.lineWidth = lw;
    ctx.setLineDash([6 * lw, 4 * lw]);
    ctx.strokeStyle = "#ffd23f";
    ctx.strokeRect(x + lw / 2, y + lw / 2, Math.max(0, w - lw), Math.max(0, hgt - lw));
    ctx.setLineDash([]);
    const label = `${r[2]}×${r[3]}`;
    ctx.font = `${12 * lw / 1.5}px system-ui, sans-serif`;
    const tw = ctx.measureText(label).width + 8 * lw / 1.5;
    const th = 18 * lw / 1.5;
    const ly = y >= th ? y - th : Math.min(ch - th, y + hgt);
    ctx.fillStyle = "#ffd23f";
    ctx.fillRect(x, ly, tw, th);
    ctx.fillStyle = "#1a1a1a";
    ctx.textBaseline = "middle";
    ctx.fillText(label, x + 4 * lw / 1.5, ly + th / 2);
  }

  /** A pointer event's position in image pixels, clamped to the image. */
  function toImage(ev) {
    const rect = els.canvas.getBoundingClientRect();
    const { width: W, height: H } = state.preview;
    const x = ((ev.clientX - rect.left) / rect.width) * W;
    const y = ((ev.clientY - rect.top) / rect.height) * H;
    return [Math.min(W, Math.max(0, x)), Math.min(H, Math.max(0, y))];
  }

  function rectFromPoints(a, b) {
    const { width: W, height: H } = state.preview;
    const x0 = Math.max(0, Math.floor(Math.min(a[0], b[0])));
    const y0 = Math.max(0, Math.floor(Math.min(a[1], b[1])));
    const x1 = Math.min(W, Math.ceil(Math.max(a[0], b[0])));
    const y1 = Math.min(H, Math.ceil(Math.max(a[1], b[1])));
    return [x0, y0, Math.max(0, x1 - x0), Math.max(0, y1 - y0)];
  }

  function setRoi(roi) {
    state.roi = roi;
    els.roi.value = roi ? roi.join(",") : "";
    els.roi.removeAttribute("aria-invalid");
    updateButtons();
    draw();
  }

  /** The ROI text field: "" (whole image), or "x,y,w,h" inside the image. */
  function parseRoiField() {
    const text = els.roi.value.trim();
    if (!text) return { roi: null };
    const m = /^(\d+)\s*[, ]\s*(\d+)\s*[, ]\s*(\d+)\s*[, ]\s*(\d+)$/.exec(text);
    if (!m) return { error: "The region of interest must be four whole numbers x,y,w,h (or empty for the whole image)." };
    const roi = m.slice(1).map(Number);
    if (roi[2] <= 0 || roi[3] <= 0) return { error: "The region of interest needs a width and a height above 0." };
    if (state.preview && (roi[0] + roi[2] > state.preview.width || roi[1] + roi[3] > state.preview.height)) {
      return { error: `The region of interest ${roi.join(",")} does not lie inside the ` +
        `${state.preview.width} × ${state.preview.height} image.` };
    }
    return { roi };
  }

  function onRoiField() {
    const parsed = parseRoiField();
    if (parsed.error) {
      els.roi.setAttribute("aria-invalid", "true");
      showError(new Error(parsed.error));
      return;
    }
    hideError();
    setRoi(parsed.roi);
  }

  els.canvas.addEventListener("pointerdown", (ev) => {
    if (!state.preview || ev.button !== 0) return;
    ev.preventDefault();
    els.canvas.setPointerCapture(ev.pointerId);
    const p = toImage(ev);
    state.drag = { a: p, b: p, id: ev.pointerId };
  });
  els.canvas.addEventListener("pointermove", (ev) => {
    if (!state.drag || ev.pointerId !== state.drag.id) return;
    state.drag.b = toImage(ev);
    draw();
  });
  const endDrag = (ev, keep) => {
    if (!state.drag || ev.pointerId !== state.drag.id) return;
    state.drag.b = toImage(ev);
    const r = rectFromPoints(state.drag.a, state.drag.b);
    state.drag = null;
    if (keep && r[2] >= MIN_ROI_PX && r[3] >= MIN_ROI_PX) setRoi(r);
    else draw();
  };
  els.canvas.addEventListener("pointerup", (ev) => endDrag(ev, true));
  els.canvas.addEventListener("pointercancel", (ev) => endDrag(ev, false));

  els.clearRoi.addEventListener("click", () => { hideError(); setRoi(null); });
  els.roi.addEventListener("change", onRoiField);
  els.roi.addEventListener("input", updateButtons);

  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(layoutCanvas, 100);
  });

  // drop a file on the viewer
  els.viewer.addEventListener("dragover", (ev) => {
    if (ev.dataTransfer && Array.from(ev.dataTransfer.types || []).includes("Files")) {
      ev.preventDefault();
      els.viewer.classList.add("drop");
    }
  });
  els.viewer.addEventListener("dragleave", () => els.viewer.classList.remove("drop"));
  els.viewer.addEventListener("drop", (ev) => {
    els.viewer.classList.remove("drop");
    if (!ev.dataTransfer || !ev.dataTransfer.files.length) return;
    ev.preventDefault();
    els.file.files = ev.dataTransfer.files;
    onFile(els.file.files[0]);
  });

  els.file.addEventListener("change", () => onFile(els.file.files[0]));
  els.modality.addEventListener("change", updateModalityHint);

  // ------------------------------------------------------------------ analyze

  async function analyze(ev) {
    if (ev) ev.preventDefault();
    hideError();
    if (!state.file) { showError(new Error("Choose an image file first.")); return; }
    const parsed = parseRoiField();
    if (parsed.error) { els.roi.setAttribute("aria-invalid", "true"); showError(new Error(parsed.error)); return; }
    if (JSON.stringify(parsed.roi) !== JSON.stringify(state.roi)) setRoi(parsed.roi);

    let modality = els.modality.value;
    if (modality === "auto") {
      if (state.preview && !state.preview.modality) {
        showError(new Error("Choose the modality (mammography or ultrasound): this file has no DICOM header naming it."));
        els.modality.focus();
        return;
      }
      modality = "";  // the service reads the DICOM header
    }
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    form.append("modality", modality);
    form.append("explain", els.explain.checked ? "true" : "false");
    form.append("roi", state.roi ? state.roi.join(",") : "");

    state.analyzing = true;
    els.results.setAttribute("aria-busy", "true");
    setBusy(true, "Analyzing…");
    const started = performance.now();
    try {
      const answer = await api("analyze", form);
      renderResults(answer, { seconds: (performance.now() - started) / 1000, file: state.file.name });
    } catch (exc) {
      placeholder("No results: the request failed.");
      showError(exc);
    } finally {
      state.analyzing = false;
      els.results.removeAttribute("aria-busy");
      setBusy(false);
    }
  }

  els.form.addEventListener("submit", analyze);

  // ------------------------------------------------------------------ results

  function renderResults(answer, info) {
    const nodes = [];
    const roi = Array.isArray(answer.roi) ? answer.roi : null;
    nodes.push(h("div", { class: "summary", dataset: { testid: "summary" } },
      h("span", {}, "Modality ", h("strong", { dataset: { testid: "result-modality" } }, answer.modality)),
      h("span", {}, "Region ", h("strong", { dataset: { testid: "result-roi", roi: roi ? roi.join(",") : "" } },
        roi ? `x ${roi[0]}, y ${roi[1]}, ${roi[2]}×${roi[3]} px` : "whole image")),
      info && info.file ? h("span", { class: "muted" }, info.file) : null,
      info ? h("span", { class: "muted" }, `${info.seconds.toFixed(2)} s`) : null));

    if (answer.eight_category) nodes.push(eightCategoryCard(answer.eight_category));

    const cards = Object.entries(answer.models || {}).map(([name, a]) => modelCard(name, a));
    if (!cards.length) nodes.push(h("p", { class: "placeholder" }, "No model answered for this modality."));
    nodes.push(h("div", { class: "cards" }, cards));
    nodes.push(h("p", { class: "disclaimer small", role: "note" },
      "Research use only — not for diagnosis. These are outputs of experimental models, not clinical findings."));
    els.results.replaceChildren(...nodes);
  }

  function badges(a) {
    return h("span", { class: "badges" },
      h("span", { class: "badge version", dataset: { testid: "version" }, title: "registry version" },
        a.version != null ? `version ${a.version}` : "version ?"),
      h("span", { class: `badge stage stage-${a.stage || "other"}`, dataset: { testid: "stage" }, title: "registry stage" },
        a.stage || "unknown stage"));
  }

  function modelCard(name, a) {
    const described = state.models[name] || {};
    const meta = h("dl", { class: "meta" },
      h("dt", {}, "Task"), h("dd", {}, a.task),
      h("dt", {}, "Image size"), h("dd", { dataset: { testid: "size", width: a.width, height: a.height } },
        `${a.width} × ${a.height} px`),
      h("dt", {}, "Spec"), h("dd", { class: "mono", dataset: { testid: "spec-id" } }, a.spec_id || "—"));
    const card = h("article", {
      class: "card model-card", dataset: { model: name, testid: `model-card-${name}`, task: a.task },
      "aria-label": `${name} model`,
    }, h("header", { class: "card-head" }, h("h3", {}, name), badges(a)), meta);

    // by the keys the answer has: a multi-task model's has both parts, from one model call
    if (a.probabilities) {
      card.append(h("p", { class: "predicted" }, "Predicted ",
        h("strong", { dataset: { testid: "predicted" } }, a.predicted),
        h("span", { class: "muted" }, ` ${pct(a.confidence)}`)));
      if (described.decision) {  // an operating point other than the most probable class (/models)
        card.append(h("p", { class: "decision muted", dataset: { testid: "decision" } },
          `Decision rule: ${described.decision}`));
      }
      card.append(probBars(a.probabilities, a.predicted, `${name} class probabilities`));
    }
    if (a.mask_png) {
      const found = a.lesion_area_px > 0;
      card.append(h("p", { class: "predicted" }, found ? "Lesion " : "",
        h("strong", { dataset: { testid: "lesion-area" } },
          found ? `${fmtInt(a.lesion_area_px)} px` : "No lesion found"),
        found ? h("span", { class: "muted", dataset: { testid: "lesion-fraction" } },
          ` ${pct(a.lesion_fraction, 2)} of the image`) : null));
      const bbox = Array.isArray(a.bbox) ? a.bbox : null;
      card.append(h("dl", { class: "meta" },
        h("dt", {}, "Area"), h("dd", {}, `${fmtInt(a.lesion_area_px)} px (${pct(a.lesion_fraction, 2)})`),
        h("dt", {}, "Bounding box"), h("dd", { dataset: { testid: "bbox" } },
          bbox ? `x ${bbox[0]}, y ${bbox[1]}, ${bbox[2]}×${bbox[3]} px` : "none"),
        described.threshold != null ? h("dt", {}, "Threshold") : null,
        described.threshold != null ? h("dd", {}, String(described.threshold)) : null));
    }
    if (a.overlay_png && a.heatmap_png) {  // explained: the heatmap is drawn, not the mask
      card.append(figure(a.overlay_png, "gradcam", `Grad-CAM overlay of the ${name} model for ${a.predicted}`,
        `Grad-CAM: evidence for “${a.predicted}” (red = strongest)`));
    } else if (a.overlay_png && a.mask_png) {
      card.append(figure(a.overlay_png, "mask-overlay", `Lesion mask of the ${name} model drawn in red over the image`,
        "Lesion mask (red) over the image"));
    }
    return card;
  }

  function probBars(probabilities, predicted, label) {
    return h("ul", { class: "probs", "aria-label": label },
      Object.entries(probabilities).map(([cls, p]) => {
        const fill = h("span", { class: "prob-fill" });
        fill.style.width = `${Math.max(0, Math.min(100, 100 * p)).toFixed(2)}%`;
        return h("li", {
          class: cls === predicted ? "prob is-predicted" : "prob",
          dataset: { class: cls, p: String(p) },
        },
        h("span", { class: "prob-label" }, cls),
        h("span", { class: "prob-bar", "aria-hidden": "true" }, fill),
        h("span", { class: "prob-value", dataset: { testid: "prob-value" } }, pct(p)));
      }));
  }

  function figure(b64, testid, alt, caption) {
    return h("figure", { class: "overlay-fig" },
      h("img", { class: "overlay", src: `data:image/png;base64,${b64}`, alt, dataset: { testid } }),
      h("figcaption", {}, caption));
  }

  function eightCategoryCard(e) {
    const probs = e.probabilities || {};
    const kinds = [], letters = [];
    for (const key of Object.keys(probs)) {
      const i = key.lastIndexOf("-");
      const kind = key.slice(0, i), letter = key.slice(i + 1);
      if (!kinds.includes(kind)) kinds.push(kind);
      if (!letters.includes(letter)) letters.push(letter);
    }
    const grid = h("table", { class: "grid8", dataset: { testid: "eight-grid" } },
      h("caption", { class: "visually-hidden" }, "Joint probability of each category"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "pathology")),
        letters.map((l) => h("th", { scope: "col", title: `BI-RADS density ${l}` }, l)))),
      h("tbody", {}, kinds.map((kind) => h("tr", {}, h("th", { scope: "row" }, kind),
        letters.map((l) => {
          const key = `${kind}-${l}`;
          const p = probs[key] ?? 0;
          const td = h("td", { class: key === e.category ? "is-predicted" : null, dataset: { category: key, p: String(p) } },
            pct(p));
          const tone = kind === "malignant" ? "220, 70, 60" : "40, 120, 200";
          td.style.backgroundColor = `rgba(${tone}, ${(0.07 + 0.75 * Math.min(1, Math.max(0, p))).toFixed(3)})`;
          return td;
        })))));
    const lesionFinding = e.finding === "benign" || e.finding === "malignant";
    return h("section", { class: "card eight", id: "eight-category", dataset: { testid: "eight-category" },
      "aria-labelledby": "eight-title" },
      h("header", { class: "card-head" },
        h("h3", { id: "eight-title" }, "8-category view"),
        h("span", { class: "muted" }, "pathology × BI-RADS density")),
      h("p", { class: "category", dataset: { testid: "finding-headline" } },
        h("strong", {}, `Finding: ${e.finding}`),
        h("span", { class: "muted" }, ` ${pct(findingProbability(e))} · density ${e.density}`)),
      h("p", { class: lesionFinding ? "conditional" : "conditional muted", dataset: { testid: "conditional" } },
        lesionFinding ? "Category: " : "If there is a lesion after all: ",
        h("strong", { dataset: { testid: "category" } }, e.category),
        h("span", { class: "muted" }, ` ${pct(e.confidence)} conditional on a lesion`)),
      h("dl", { class: "meta" },
        h("dt", {}, "Density"), h("dd", {}, e.density),
        h("dt", {}, "Pathology if a lesion"), h("dd", {}, `${e.pathology} (P(malignant | lesion) ${pct(e.p_malignant)})`),
        h("dt", {}, "Tumor model finding"), h("dd", { dataset: { testid: "finding" } }, e.finding),
        e.p_normal != null ? h("dt", {}, "P(normal)") : null,
        e.p_normal != null ? h("dd", {}, pct(e.p_normal)) : null),
      h("div", { class: "table-wrap" }, grid),
      h("p", { class: "hint" }, "The finding is the tumor model's own top class (it may be “normal”). " +
        "The grid crosses the likelier lesion type with the density class: probabilities given that " +
        "there is a lesion, not the chance that there is one."));
  }

  // P(finding) from the view: P(normal), or P(no normal) x P(type | lesion).
  function findingProbability(e) {
    if (e.finding === "normal") return e.p_normal;
    const lesion = e.p_normal != null ? 1 - e.p_normal : 1;
    return lesion * (e.finding === "malignant" ? e.p_malignant : 1 - e.p_malignant);
  }

  // ------------------------------------------------------------------ start
  state.key = storedKey();
  els.apiKey.value = state.key;
  els.keyForm.hidden = !state.key;
  updateModalityHint();
  updateButtons();
  loadModels();
})();
