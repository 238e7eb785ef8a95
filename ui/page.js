// The service's page: Status (GET /status), Jobs (GET/POST /jobs, DELETE /jobs/{id}), Evaluate (POST /evaluations,
// GET /evaluations/{id}, POST /evaluations/{id}/apply), Try it (POST /try).
// No library, nothing from outside this server. The Label Studio key stays in sessionStorage (this tab only) and
// travels only in the X-Label-Studio-Key header of the requests that need it.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "groundedSamLabelStudioKey";
const key = () => sessionStorage.getItem(KEY) || "";

async function api(path, options = {}) {
  const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
  if (options.withKey && key()) headers["X-Label-Studio-Key"] = key();
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { method: options.method || "GET", headers, body: options.body,
                                        credentials: "same-origin" });
  let data = null;
  try { data = await response.json(); } catch (e) { data = { error: `${response.status} ${response.statusText}` }; }
  if (!response.ok) {
    const error = new Error((data && data.error) || `${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

const fmt = {
  secs(s) {
    if (s === null || s === undefined) return "–";
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
  time(t) { return new Date(t * 1000).toLocaleTimeString(); },
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- the key ---------------------------------------------------------------------------------------------------
function showKeyState() {
  $("key-state").textContent = key() ? "key set for this tab" : "no key: jobs are read-only";
  document.querySelectorAll("button.needs-key").forEach((b) => { b.disabled = !key(); });
}
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("key").value.trim();
  if (value) sessionStorage.setItem(KEY, value);
  $("key").value = "";
  showKeyState();
  refreshJobs();
});
$("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); showKeyState(); refreshJobs(); });

// ---- status ----------------------------------------------------------------------------------------------------
// The scheduler's queue (GET /status's "queue"), and answers per minute by kind since the previous poll.
let lastQueue = null;
function queueRows(q) {
  if (!q) return [];
  const kinds = ["click", "prompt", "batch"];
  const now = Date.now();
  const rates = lastQueue ? kinds.map((k) => {
    const minutes = (now - lastQueue.at) / 60000;
    return `${k} ${Math.round(((q.served[k] || 0) - (lastQueue.served[k] || 0)) / minutes)}`;
  }).join(" · ") : "–";
  lastQueue = { at: now, served: q.served };
  const refused = Object.entries(q.refused).map(([reason, n]) => `${reason} ${n}`).join(" · ") || "none";
  return [
    ["model queue", kinds.map((k) => `${k} ${q.admitted[k]}`).join(" · ") + ` admitted; ` +
      `${Object.values(q.waiting).reduce((a, b) => a + b, 0)} waiting, ${q.running} running ` +
      `(${q.concurrency} at once + a click)`],
    ["answered per minute", rates],
    ["refused (503)", refused],
  ];
}

async function refreshStatus() {
  try {
    const s = await api("/status");
    const grid = $("status-grid");
    const cache = s.cache || {};
    const computed = cache.computed || {};
    const rows = [
      ["models", s.models + (s.error ? `: ${s.error}` : "")],
      ["model version", s.model_version],
      ["device, precision", s.device ? `${s.device}, ${s.precision}` : "–"],
      ["load time", s.load_seconds !== undefined ? `${s.load_seconds} s` : "–"],
      ["memory (RSS)", `${s.memory.rss_mb} MB`],
      ["GPU memory", s.memory.gpu ? `${s.memory.gpu.allocated_mb} MB allocated, ${s.memory.gpu.used_mb} of ` +
        `${s.memory.gpu.total_mb} MB used` : "no GPU in use"],
      ["cache", s.cache ? `${cache.entries} entries, ${cache.mb} MB, hit rate ` +
        (cache.hit_rate === null ? "–" : `${Math.round(cache.hit_rate * 100)} %`) +
        ` (${cache.hits} hits, ${cache.misses} misses)` : "–"],
      ["detector passes", String((computed["groundingdino-outputs"] || 0) + (computed["sam3-query"] || 0))],
      ["image encoder passes", String((computed["sam-embedding"] || 0) + (computed["sam3-features"] || 0))],
      ["worker", `pid ${s.pid}, up ${fmt.secs(s.uptime_seconds)}`],
      ...queueRows(s.queue),
    ];
    grid.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    grid.querySelectorAll("dd")[7].id = "detector-passes";
    $("status-line").textContent = `Models ${s.models}.`;
    $("requests").tBodies[0].replaceChildren(...s.requests.map((r) => el("tr", {},
      el("td", { text: fmt.time(r.at) }), el("td", { text: `${r.method} ${r.path}` }),
      el("td", { text: String(r.status) }), el("td", { text: String(r.ms) }))));
  } catch (e) {
    $("status-line").textContent = `Status unavailable: ${e.message}`;
  }
}

// ---- jobs ------------------------------------------------------------------------------------------------------
let jobsTimer = null;
function jobItem(job) {
  const c = job.counts;
  const total = job.total || (c.done + c.failed + c.skipped + (c.pending || 0) + (c.importing || 0)) || 0;
  const finished = c.done + c.failed + c.skipped;
  const bar = el("div", { className: "bar", role: "progressbar", "aria-label": `job ${job.id} progress`,
                          "aria-valuemin": "0", "aria-valuemax": String(total || 1),
                          "aria-valuenow": String(finished) });
  for (const part of ["done", "failed", "skipped"]) {
    const share = total ? (100 * c[part]) / total : 0;
    const span = el("span", { className: part, title: `${part}: ${c[part]}` });
    span.style.width = `${share}%`; // CSSOM, not a style attribute: the page's CSP allows no inline style
    bar.append(span);
  }
  const cancel = el("button", { type: "button", className: "needs-key", "data-job": job.id,
                                "aria-label": `Cancel job ${job.id}`, text: "Cancel" });
  cancel.disabled = !key();
  cancel.hidden = !["queued", "running", "paused", "interrupted"].includes(job.state);
  if (!key()) cancel.title = "needs your Label Studio key";
  cancel.addEventListener("click", () => cancelJob(job.id));
  const item = el("li", { className: "job", "data-job": job.id },
    el("div", { className: "job-head" },
      el("span", {}, el("span", { className: `state state-${job.state}`, text: job.state }),
         ` · project ${job.project} · job ${job.id}`), cancel),
    bar,
    el("div", { className: "counts", text: `${finished} of ${total || "?"} · ${c.done} done, ${c.failed} failed, ` +
                 `${c.skipped} skipped · ${job.rate} tasks/s · ETA ${fmt.secs(job.eta_seconds)}` }),
    el("div", { className: "hint", text: `prompt “${job.prompt}”` + (job.reason ? ` · ${job.reason}` : "") }));
  if (job.recent_failures && job.recent_failures.length) {
    const list = el("ul", { className: "failures" });
    for (const f of job.recent_failures) {
      const task = f.task_id !== undefined ? f.task_id : f.task;
      list.append(el("li", { text: `task ${task}: ${f.kind} — ${f.reason}` }));
    }
    item.append(el("details", {}, el("summary", { text: `${c.failed} failure(s)` }), list));
  }
  return item;
}

async function refreshJobs() {
  clearTimeout(jobsTimer);
  try {
    const { jobs } = await api("/jobs");
    const open = new Set([...document.querySelectorAll("#job-list details[open]")]
      .map((d) => d.closest("li").dataset.job));
    $("job-list").replaceChildren(...jobs.map(jobItem));
    document.querySelectorAll("#job-list li").forEach((li) => {
      if (open.has(li.dataset.job)) { const d = li.querySelector("details"); if (d) d.open = true; }
    });
    const running = jobs.filter((j) => j.state === "running").length;
    const line = jobs.length ? `${jobs.length} job(s), ${running} running.` : "No job yet.";
    if ($("jobs-line").textContent !== line) $("jobs-line").textContent = line;
    jobsTimer = setTimeout(refreshJobs, running ? 1000 : 4000);
  } catch (e) {
    $("jobs-line").textContent = `Jobs unavailable: ${e.message}`;
    jobsTimer = setTimeout(refreshJobs, 5000);
  }
}

async function cancelJob(id) {
  try {
    const job = await api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE", withKey: true });
    $("jobs-line").textContent = `Job ${id}: ${job.state}.`;
  } catch (e) {
    $("jobs-line").textContent = `Cancel failed: ${e.message}`;
  }
  refreshJobs();
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const state = $("job-form-state");
  if (!key()) { state.textContent = "Enter your Label Studio key first (top of the page)."; return; }
  const body = { project: Number($("job-project").value) };
  const tasks = $("job-tasks").value.trim();
  if (tasks) body.tasks = tasks; else body.all = true;
  if ($("job-prompt").value.trim()) body.prompt = $("job-prompt").value.trim();
  if ($("job-url").value.trim()) body.label_studio_url = $("job-url").value.trim();
  try {
    const job = await api("/jobs", { method: "POST", json: body, withKey: true });
    state.textContent = `Job ${job.id} ${job.state}.`;
  } catch (e) {
    state.textContent = `Not started: ${e.message}`;
  }
  refreshJobs();
});

// ---- evaluate --------------------------------------------------------------------------------------------------
let evaluation = null;
const num = (v) => (v === null || v === undefined ? "–" : v.toFixed(3));

function figuresTable(name, part) {
  const masks = name === "masks";
  const heads = ["label", "AP", "AP50", "precision", "recall", "F1", "annotated", "predicted", "matched",
                 ...(masks ? ["mean IoU"] : [])];
  const head = el("tr", {}, ...heads.map((h, i) => el("th", { scope: "col", className: i ? "num" : "", text: h })));
  const rows = [...Object.entries(part.labels), ["(all)", part.overall]].map(([label, e]) => el("tr", {},
    el("th", { scope: "row", text: label }),
    ...[num(e.ap), num(e.ap50), num(e.precision), num(e.recall), num(e.f1), e.annotated, e.predicted, e.matched,
        ...(masks ? [num(e.mean_iou)] : [])].map((v) => el("td", { className: "num", text: String(v) }))));
  return el("table", { className: "small" },
    el("caption", { text: `${name}: COCO AP and AP50; precision, recall, F1 at IoU 0.5 and the thresholds in force` }),
    el("thead", {}, head), el("tbody", {}, ...rows));
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function curve(label, entry, gates) {
  // Recall on x, precision on y, both 0..1; one dot per threshold point tried, the chosen one circled.
  const size = 200, pad = 28, span = size - 2 * pad, n = gates.length;
  const x = (r) => pad + r * span, y = (p) => size - pad - p * span;
  const svg = svgEl("svg", { width: size, height: size, viewBox: `0 0 ${size} ${size}`, role: "img",
                             "aria-label": `${label}: precision against recall over the thresholds tried` });
  svg.append(svgEl("rect", { x: pad, y: pad, width: span, height: span, fill: "none", stroke: "#9aa4ae" }));
  const xl = svgEl("text", { x: size / 2, y: size - 8, "text-anchor": "middle" }); xl.textContent = "recall";
  const yl = svgEl("text", { x: 10, y: size / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${size / 2})` });
  yl.textContent = "precision";
  svg.append(xl, yl);
  for (const point of entry.curve) {
    const [p, r] = [point[n], point[n + 1]];
    if (p === null || r === null) continue;
    svg.append(svgEl("circle", { cx: x(r), cy: y(p), r: 2.5, fill: "#7aa6d6" }));
  }
  if (entry.chosen) {
    svg.append(svgEl("circle", { cx: x(entry.recall), cy: y(entry.precision), r: 6, fill: "none",
                                 stroke: "#d0342c", "stroke-width": 2, class: "chosen" }));
  }
  const chosen = entry.chosen ? Object.entries(entry.chosen).map(([k, v]) => `${k} ${v}`).join(", ")
                              : "no point finds it (nothing chosen)";
  return el("figure", { "data-label": label }, svg, el("figcaption", { text: `${label}: ${chosen}` }));
}

function showEvaluation(run) {
  const report = run.report;
  const kinds = ["boxes", "masks"].filter((k) => report[k]);
  $("eval-tables").replaceChildren(...kinds.map((k) => figuresTable(k, report[k])));
  const sweep = report.thresholds;
  $("eval-curves").replaceChildren(...(sweep
    ? Object.entries(sweep.labels).map(([label, entry]) => curve(label, entry, sweep.gates))
    : [el("p", { className: "hint", text: "Stored predictions: no thresholds tried." })]));
  const chosen = report.extra_params && Object.keys(report.extra_params.label_thresholds).length;
  $("eval-snippet").value = chosen ? JSON.stringify(report.extra_params) : "";
  $("eval-apply").hidden = !chosen;
  $("eval-result").hidden = false;
}

async function followEvaluation() {
  try {
    const run = await api(`/evaluations/${encodeURIComponent(evaluation)}`, { withKey: true });
    const of = run.total ? ` of ${run.total}` : "";
    const counts = `${run.done + run.failed + run.skipped}${of} tasks: ${run.done} evaluated, ${run.failed} failed, ` +
                   `${run.skipped} skipped`;
    if (run.state === "done") {
      const notes = run.report.notes;
      $("eval-state").textContent = `Evaluation ${run.id} of project ${run.project} done: ${counts}; ` +
        `${run.report.predictions}.` + (notes.failed.length ? ` Not evaluated: ${notes.failed.map(
          (f) => `task ${f.task} (${f.reason})`).join("; ")}.` : "");
      showEvaluation(run);
    } else if (run.state === "failed") {
      $("eval-state").textContent = `Evaluation ${run.id} failed: ${run.error}`;
    } else {
      $("eval-state").textContent = `Evaluation ${run.id} of project ${run.project} ${run.state}: ${counts}…`;
      setTimeout(followEvaluation, 1000);
    }
  } catch (e) {
    $("eval-state").textContent = `Evaluation unavailable: ${e.message}`;
  }
}

$("eval-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!key()) { $("eval-state").textContent = "Enter your Label Studio key first (top of the page)."; return; }
  const body = { project: Number($("eval-project").value) };
  const tasks = $("eval-tasks").value.trim();
  if (tasks) body.tasks = tasks; else body.all = true;
  if ($("eval-prompt").value.trim()) body.prompt = $("eval-prompt").value.trim();
  if ($("eval-version").value.trim()) body.model_version = $("eval-version").value.trim();
  if ($("eval-target").value) body.target_precision = Number($("eval-target").value);
  $("eval-result").hidden = true;
  $("eval-apply-state").textContent = "";
  try {
    const run = await api("/evaluations", { method: "POST", json: body, withKey: true });
    evaluation = run.id;
    followEvaluation();
  } catch (e) {
    $("eval-state").textContent = `Not started: ${e.message}`;
  }
});

$("eval-apply").addEventListener("click", async () => {
  try {
    await api(`/evaluations/${encodeURIComponent(evaluation)}/apply`, { method: "POST", withKey: true });
    $("eval-apply-state").textContent = "Written: the next predictions use these thresholds.";
  } catch (e) {
    $("eval-apply-state").textContent = `Not applied: ${e.message}`;
  }
});

// ---- try it ----------------------------------------------------------------------------------------------------
const tryState = { image: null, answer: null, phrases: null, clicks: [], cursor: null, seq: 0 };

function colorOf(label) {
  let h = 0;
  for (const ch of label) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return h;
}

function settingsJson() {
  const prompt = $("try-prompt").value.trim();
  const settings = { prompt, box_threshold: Number($("box-threshold").value),
                     text_threshold: Number($("text-threshold").value) };
  $("settings-json").value = JSON.stringify(settings);
  return settings;
}

function sourceBody() {
  // The image: one held by the server already (re-filter, clicks), else what the form names.
  const file = $("try-file").files[0];
  if (file) return { kind: "image", file };
  if ($("try-url").value.trim()) return { kind: "url", body: { url: $("try-url").value.trim() } };
  if ($("try-task").value) {
    return { kind: "task", body: { task: Number($("try-task").value), project: Number($("try-project").value) } };
  }
  return null;
}

async function runTry({ reuse = false, clicks = null } = {}) {
  const seq = ++tryState.seq;
  const settings = settingsJson();
  const phrases = tryState.phrases || [];
  const query = clicks ? { clicks, label: phrases.length ? phrases[0].label : "object" } : settings;
  let source = reuse && tryState.image ? { kind: "image_id", body: { image_id: tryState.image.id } } : sourceBody();
  if (!source) { $("try-state").textContent = "Choose an image: upload one, give a URL, or a task id."; return; }
  $("try-state").textContent = "Working…";
  const send = (src) => {
    if (src.kind === "image") {
      const form = new FormData();
      form.append("image", src.file);
      for (const [k, v] of Object.entries(query)) form.append(k, typeof v === "string" ? v : JSON.stringify(v));
      return api("/try", { method: "POST", body: form, withKey: true });
    }
    return api("/try", { method: "POST", json: Object.assign({}, src.body, query), withKey: true });
  };
  let answer;
  try {
    try {
      answer = await send(source);
    } catch (e) {
      if (e.status !== 404 || source.kind !== "image_id" || !sourceBody()) throw e;
      source = sourceBody(); // this worker no longer holds it: send the image again
      answer = await send(source);
    }
  } catch (e) {
    if (seq === tryState.seq) $("try-state").textContent = `Error: ${e.message}`;
    return;
  }
  if (seq !== tryState.seq) return; // a later request (slider moved again) wins
  tryState.answer = answer;
  if (answer.phrases) tryState.phrases = answer.phrases; // a click's mask takes the prompt's first label
  const changed = !tryState.image || tryState.image.id !== answer.image_id;
  tryState.image = { id: answer.image_id, width: answer.width, height: answer.height };
  if (changed) await showImage(answer);
  draw();
  listDetections(answer);
  // what this request computed (answer.ran), whatever a running job computes meanwhile
  const ran = answer.ran || {};
  const detector = (ran["groundingdino-outputs"] || 0) + (ran["sam3-query"] || 0);
  const encoder = (ran["sam-embedding"] || 0) + (ran["sam3-features"] || 0);
  let note = "";
  if (answer.mode === "prompt") {
    note = detector ? ` The detector ran${encoder ? " and SAM encoded the image" : ""}.`
      : " Re-filtered the cached detector outputs: no new detector pass" + (encoder ? "." : ", no image encoder pass.");
  }
  $("try-state").textContent = `${answer.detections.length} region(s) on the ${answer.width}×${answer.height} image ` +
    `in ${answer.seconds} s.${note}`;
  $("try-state").dataset.count = String(answer.detections.length);
  refreshStatus();
}

function showImage(answer) {
  return new Promise((resolve) => {
    const img = $("stage-img");
    $("stage").hidden = false;
    img.onload = () => resolve();
    img.onerror = () => resolve();
    img.src = `/try/image/${answer.image_id}`;
    $("stage-masks").width = answer.width;
    $("stage-masks").height = answer.height;
    $("stage-svg").setAttribute("viewBox", `0 0 ${answer.width} ${answer.height}`);
  });
}

function draw() {
  const answer = tryState.answer;
  if (!answer) return;
  const { width, height } = answer;
  const canvas = $("stage-masks");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  if ($("show-masks").checked) {
    const data = ctx.createImageData(width, height);
    for (const d of answer.detections) {
      if (!d.mask) continue;
      const [r, g, b] = hslToRgb(colorOf(d.label), 0.8, 0.5);
      let pos = 0, on = false;
      for (const run of d.mask) {
        if (on) {
          for (let i = pos; i < pos + run; i++) {
            const o = i * 4; data.data[o] = r; data.data[o + 1] = g; data.data[o + 2] = b; data.data[o + 3] = 110;
          }
        }
        pos += run; on = !on;
      }
    }
    ctx.putImageData(data, 0, 0);
  }
  const svg = $("stage-svg");
  const ns = "http://www.w3.org/2000/svg";
  // sizes in screen pixels, whatever the image's size: viewBox units per displayed pixel
  const shown = svg.getBoundingClientRect().width;
  const unit = shown > 0 ? width / shown : 1;
  const stroke = 2 * unit;
  const size = 13 * unit;
  const shapes = [];
  const make = (tag, attrs) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };
  answer.detections.forEach((d, i) => {
    const color = `hsl(${colorOf(d.label)} 80% 42%)`;
    const [x0, y0, x1, y1] = d.box;
    if ($("show-boxes").checked) {
      shapes.push(make("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, fill: "none", stroke: color,
                                 "stroke-width": stroke, class: "region", "data-index": i }));
    }
    if ($("show-polygons").checked) {
      for (const poly of d.polygons) {
        shapes.push(make("polygon", { points: poly.map((p) => p.join(",")).join(" "), fill: "none", stroke: color,
                                      "stroke-width": stroke, "stroke-dasharray": `${stroke * 3} ${stroke * 2}` }));
      }
    }
    if ($("show-labels").checked) {
      const text = make("text", { x: x0 + stroke, y: Math.max(size, y0 - stroke), fill: color,
                                  "font-size": size });
      text.textContent = `${d.label} ${d.score.toFixed(2)}`;
      shapes.push(text);
    }
  });
  for (const c of tryState.clicks) {
    shapes.push(make("circle", { cx: c.x, cy: c.y, r: 6 * unit, fill: c.positive ? "#1e7a3a" : "#b3261e",
                                 stroke: "#fff", "stroke-width": stroke }));
  }
  if (tryState.cursor) {
    const { x, y } = tryState.cursor;
    shapes.push(make("path", { d: `M${x - size} ${y}H${x + size}M${x} ${y - size}V${y + size}`, stroke: "#f0a30a",
                               "stroke-width": stroke * 1.5 }));
  }
  svg.replaceChildren(...shapes);
}

function hslToRgb(h, s, l) {
  const k = (n) => (n + h / 30) % 12;
  const a = s * Math.min(l, 1 - l);
  const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
  return [Math.round(255 * f(0)), Math.round(255 * f(8)), Math.round(255 * f(4))];
}

function listDetections(answer) {
  const table = $("detections");
  table.hidden = false;
  table.tBodies[0].replaceChildren(...answer.detections.map((d, i) => el("tr", {},
    el("td", { text: String(i + 1) }), el("td", { text: d.label }), el("td", { text: d.score.toFixed(3) }),
    el("td", { text: d.box.map((v) => Math.round(v)).join(", ") }))));
}

$("try-form").addEventListener("submit", (event) => {
  event.preventDefault();
  tryState.clicks = [];
  runTry({ reuse: false });
});

let sliderTimer = null;
for (const [slider, out] of [["box-threshold", "box-out"], ["text-threshold", "text-out"]]) {
  $(slider).addEventListener("input", () => {
    $(out).textContent = Number($(slider).value).toFixed(2);
    settingsJson();
    clearTimeout(sliderTimer);
    if (tryState.image && tryState.phrases) {
      tryState.clicks = [];
      sliderTimer = setTimeout(() => runTry({ reuse: true }), 150);
    }
  });
}
for (const id of ["show-boxes", "show-masks", "show-polygons", "show-labels"]) $(id).addEventListener("change", draw);
for (const id of ["try-file", "try-url", "try-task", "try-project"]) {
  $(id).addEventListener("change", () => { tryState.image = null; tryState.clicks = []; });
}
$("try-prompt").addEventListener("input", settingsJson);

$("copy-settings").addEventListener("click", async () => {
  const text = JSON.stringify(settingsJson());
  try {
    await navigator.clipboard.writeText(text);
    $("try-state").textContent = "Copied: paste it into Settings → Model → Extra params.";
  } catch (e) {
    $("settings-json").focus();
    $("settings-json").select();
    $("try-state").textContent = "Selected: copy it (Ctrl+C) into Settings → Model → Extra params.";
  }
});

function addClick(x, y, positive) {
  if (!tryState.image) return;
  tryState.clicks.push({ x: Math.round(x), y: Math.round(y), positive });
  draw();
  runTry({ reuse: true, clicks: tryState.clicks });
}

$("stage-svg").addEventListener("click", (event) => {
  if (!tryState.image) return;
  const rect = event.currentTarget.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * tryState.image.width;
  const y = ((event.clientY - rect.top) / rect.height) * tryState.image.height;
  addClick(x, y, !(event.shiftKey || event.altKey));
});

$("stage-svg").addEventListener("keydown", (event) => {
  if (!tryState.image) return;
  const { width, height } = tryState.image;
  const cursor = tryState.cursor || { x: width / 2, y: height / 2 };
  const step = Math.max(1, Math.round(Math.min(width, height) / 50));
  const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  if (moves[event.key]) {
    cursor.x = Math.min(width - 1, Math.max(0, cursor.x + moves[event.key][0]));
    cursor.y = Math.min(height - 1, Math.max(0, cursor.y + moves[event.key][1]));
    tryState.cursor = cursor;
    draw();
  } else if (event.key === "Enter" || event.key === " ") {
    tryState.cursor = cursor;
    addClick(cursor.x, cursor.y, !event.shiftKey);
  } else if (event.key === "Escape") {
    tryState.clicks = [];
    tryState.cursor = null;
    draw();
  } else {
    return;
  }
  event.preventDefault();
});

showKeyState();
settingsJson();
refreshStatus();
setInterval(refreshStatus, 5000);
refreshJobs();
