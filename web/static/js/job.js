// Live job page: polls the JSON API every 500 ms while the job is queued or
// running, updates the progress, and reloads the page when the status changes.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root) return;
  var api = root.getAttribute("data-api");
  var status = root.getAttribute("data-status");
  var TERMINAL = { succeeded: 1, failed: 1, cancelled: 1 };
  if (TERMINAL[status]) return;

  var $ = function (id) { return document.getElementById(id); };
  var failures = 0;
  var timer = null;

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s) || s < 0) return "–";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    var total = Math.round(s), m = Math.floor(total / 60), sec = total % 60;
    if (m < 60) return m + " min " + (sec < 10 ? "0" : "") + sec + " s";
    var h = Math.floor(m / 60); m = m % 60;
    return h + " h " + (m < 10 ? "0" : "") + m + " min";
  }
  function score(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    return (v >= 0.001 || v === 0) ? v.toFixed(3) : v.toExponential(1);
  }
  function set(id, text) { var el = $(id); if (el) el.textContent = text; }

  // The live preview: the worker rewrites it every ~2 s; reload it at most that often.
  var previewAt = 0;
  function preview(job) {
    var img = $("live-preview");
    var url = job.artifacts && job.artifacts.preview_png;
    if (!img || !url) return;
    var now = Date.now();
    if (now - previewAt < 2000) return;
    previewAt = now;
    var next = new Image();
    next.onload = function () {
      img.src = next.src;
      img.alt = "The current mask over the image";
      img.setAttribute("data-iteration", String((job.progress || {}).iteration || 0));
      set("live-preview-caption", "Current mask (salient = bright), refreshed every 2 s");
    };
    next.src = url + (url.indexOf("?") < 0 ? "?" : "&") + "t=" + now;
  }

  function liveTargets(job) {
    var table = $("live-targets");
    var live = job.live || [];
    if (!table || live.length < 2) return;
    var body = table.tBodies[0];
    while (body.rows.length > live.length) body.deleteRow(-1);
    while (body.rows.length < live.length) {
      var row = body.insertRow(-1);
      row.className = "live-target";
      for (var c = 0; c < 4; c++) row.insertCell(-1);
    }
    live.forEach(function (e, i) {
      var cells = body.rows[i].cells, t = e.target || {}, p = e.progress || {};
      cells[0].textContent = t.label || (t.index !== null && t.index !== undefined ? "class " + t.index : "–");
      cells[1].textContent = (p.iteration || 0) + " / " + (p.total || 0);
      cells[2].textContent = score(e.score);
      cells[3].textContent = score(e.score_before);
    });
    table.hidden = false;
  }

  function render(job) {
    var p = job.progress || {};
    var bar = $("progress");
    if (bar) {
      if (p.total > 0) bar.max = p.total;
      bar.value = p.iteration || 0;
      bar.textContent = Math.round((p.fraction || 0) * 100) + "%";
    }
    set("iteration", p.iteration || 0);
    set("total", p.total || 0);
    if (job.status === "running" && p.total > 0 && p.iteration >= p.total) {
      // every mask is done; the worker is scoring them (a second or two)
      set("live-title", "Scoring faithfulness: deletion, insertion and the Grad-CAM baseline…");
    }
    set("current-score", score(job.current_score));
    set("live-score-before", score((job.scores || {}).before));
    var t = job.target || {};
    if (t.label && $("job-target")) set("job-target", t.label + " (#" + t.index + ")");
    liveTargets(job);
    preview(job);
    set("elapsed", duration(job.elapsed_s));
    set("eta", duration(job.eta_s));
    if (job.queue_position) set("queue-position", job.queue_position);
    var q = job.queue;
    var noWorker = $("no-worker");
    if (noWorker) noWorker.hidden = !(q && q.workers_online === 0);
    var etaLine = $("queue-eta-line");
    if (etaLine) {
      etaLine.hidden = !(q && q.eta_s !== null && q.eta_s !== undefined);
      if (!etaLine.hidden) set("queue-eta", duration(q.eta_s));
    }
    if (job.cancel_requested) {
      var btn = $("cancel");
      if (btn) { btn.disabled = true; btn.textContent = "Stopping…"; }
    }
  }

  function schedule(ms) { timer = window.setTimeout(poll, ms); }

  function poll() {
    fetch(api, { headers: { "Accept": "application/json" }, cache: "no-store",
                 credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (job) {
        failures = 0;
        set("live-note", "");
        render(job);
        if (job.status !== status) {
          window.location.reload();
          return;
        }
        schedule(500);
      })
      .catch(function () {
        failures += 1;
        set("live-note", "Connection problem; retrying…");
        schedule(Math.min(5000, 500 * Math.pow(2, failures)));
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer === null) poll();
  });
  schedule(500);
})();
