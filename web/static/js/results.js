// Finished job page: (re)draws each result's deletion/insertion chart as an
// inline SVG from the JSON API (the same geometry as web/charts.py, which
// renders the first paint on the server) and adds a hover read-out of the
// probabilities at the nearest fraction of pixels.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root || !document.querySelector(".curves-box")) return;
  var api = root.getAttribute("data-api");
  var NS = "http://www.w3.org/2000/svg";

  // Keep in sync with web/charts.py.
  var WIDTH = 360, HEIGHT = 220, LEFT = 50, RIGHT = 12, TOP = 12, BOTTOM = 36;
  var PW = WIDTH - LEFT - RIGHT, PH = HEIGHT - TOP - BOTTOM;
  var Y_MAXES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0];
  var X_TICKS = [0, 0.25, 0.5, 0.75, 1];
  var SOURCES = [["mask", "metrics", "Perturbation mask"], ["gradcam", "gradcam", "Grad-CAM"]];
  var KINDS = [["deletion", "Deletion"], ["insertion", "Insertion"]];

  function finite(v) { return typeof v === "number" && isFinite(v); }
  function clamp(v) { return Math.max(0, Math.min(1, v)); }
  function xPos(f) { return LEFT + clamp(f) * PW; }
  function yPos(v, top) { return TOP + PH - clamp(v / top) * PH; }
  function fmt(v) { return String(Math.round(v * 1e6) / 1e6); }
  function score(v) {
    if (!finite(v)) return "–";
    return (v >= 0.001 || v === 0) ? v.toFixed(3) : v.toExponential(1);
  }

  function yMax(values) {
    var top = 0;
    values.forEach(function (v) { if (finite(v) && v > top) top = v; });
    for (var i = 0; i < Y_MAXES.length; i++) if (top <= Y_MAXES[i] + 1e-12) return Y_MAXES[i];
    return Math.ceil(top);
  }

  function pathData(fractions, values, top) {
    var parts = [], down = false;
    for (var i = 0; i < Math.min(fractions.length, values.length); i++) {
      if (!finite(fractions[i]) || !finite(values[i])) { down = false; continue; }
      parts.push((down ? "L" : "M") + xPos(fractions[i]).toFixed(1) + "," +
                 yPos(values[i], top).toFixed(1));
      down = true;
    }
    return parts.join(" ");
  }

  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function chart(result, k, label) {
    var curves = [];
    SOURCES.forEach(function (s) {
      var m = result[s[1]];
      if (m && m.curves) curves.push({ source: s[0], name: s[2], data: m.curves });
    });
    var values = [];
    curves.forEach(function (c) {
      KINDS.forEach(function (kind) { values = values.concat(c.data[kind[0]] || []); });
    });
    var top = yMax(values);
    var series = [];
    curves.forEach(function (c) {
      KINDS.forEach(function (kind) {
        var d = pathData(c.data.fraction || [], c.data[kind[0]] || [], top);
        if (d) series.push({ source: c.source, kind: kind[0], d: d, name: kind[1] + ", " + c.name,
                             fraction: c.data.fraction || [], values: c.data[kind[0]] || [] });
      });
    });
    if (!series.length) return null;

    var svg = el("svg", { "class": "curves", id: "curves-" + k, "data-rendered": "js",
                          viewBox: "0 0 " + WIDTH + " " + HEIGHT, role: "img",
                          "aria-labelledby": "curves-" + k + "-title curves-" + k + "-desc" });
    svg.appendChild(el("title", { id: "curves-" + k + "-title" },
                       "Deletion and insertion curves for " + label));
    svg.appendChild(el("desc", { id: "curves-" + k + "-desc" },
      "Probability of " + label + " as the pixels each map ranks most salient are removed " +
      "(deletion, lower is better) or revealed (insertion, higher is better); perturbation " +
      "mask solid, Grad-CAM dashed."));
    [0, top / 2, top].forEach(function (v) {
      var y = Math.round(yPos(v, top) * 10) / 10;
      svg.appendChild(el("line", { "class": "gridline", x1: LEFT, x2: LEFT + PW, y1: y, y2: y }));
      svg.appendChild(el("text", { "class": "tick y-tick", x: LEFT - 6, y: y + 4,
                                   "text-anchor": "end" }, fmt(v)));
    });
    X_TICKS.forEach(function (f) {
      svg.appendChild(el("text", { "class": "tick x-tick", x: xPos(f), y: TOP + PH + 15,
                                   "text-anchor": "middle" }, fmt(f * 100) + "%"));
    });
    svg.appendChild(el("rect", { "class": "frame", x: LEFT, y: TOP, width: PW, height: PH }));
    svg.appendChild(el("text", { "class": "axis-label", x: LEFT + PW / 2, y: HEIGHT - 3,
                                 "text-anchor": "middle" },
                       "fraction of pixels removed / revealed"));
    svg.appendChild(el("text", { "class": "axis-label", x: -(TOP + PH / 2), y: 11,
                                 transform: "rotate(-90)", "text-anchor": "middle" },
                       "probability"));
    series.forEach(function (s) {
      var path = el("path", { "class": "curve " + s.kind + " " + s.source,
                              "data-series": s.source + "-" + s.kind, d: s.d });
      path.appendChild(el("title", {}, s.name));
      svg.appendChild(path);
    });
    addReadout(svg, series);
    return svg;
  }

  // A vertical line and the values of every series at the nearest point.
  function addReadout(svg, series) {
    var line = el("line", { "class": "cursor", x1: 0, x2: 0, y1: TOP, y2: TOP + PH,
                            visibility: "hidden" });
    var box = el("text", { "class": "readout", x: LEFT + 6, y: TOP + 14,
                           visibility: "hidden" });
    svg.appendChild(line);
    svg.appendChild(box);
    function hide() {
      line.setAttribute("visibility", "hidden");
      box.setAttribute("visibility", "hidden");
    }
    svg.addEventListener("mouseleave", hide);
    svg.addEventListener("mousemove", function (event) {
      var rect = svg.getBoundingClientRect();
      if (!rect.width) return;
      var x = (event.clientX - rect.left) * WIDTH / rect.width;
      var f = clamp((x - LEFT) / PW);
      var ref = series[0].fraction, best = -1, dist = Infinity;
      for (var i = 0; i < ref.length; i++) {
        if (finite(ref[i]) && Math.abs(ref[i] - f) < dist) { dist = Math.abs(ref[i] - f); best = i; }
      }
      if (best < 0) { hide(); return; }
      var at = ref[best];
      line.setAttribute("x1", xPos(at));
      line.setAttribute("x2", xPos(at));
      while (box.firstChild) box.removeChild(box.firstChild);
      box.appendChild(el("tspan", { x: LEFT + 6, dy: 0 }, Math.round(at * 100) + "% of pixels"));
      series.forEach(function (s) {
        box.appendChild(el("tspan", { x: LEFT + 6, dy: 13, "class": s.kind + " " + s.source },
                           s.name + ": " + score(s.values[best])));
      });
      line.setAttribute("visibility", "visible");
      box.setAttribute("visibility", "visible");
    });
  }

  function draw(job) {
    (job.results || []).forEach(function (result, k) {
      var slot = document.querySelector('.curves-box[data-curves="' + k + '"]');
      if (!slot) return;
      var target = result.target || {};
      var label = target.label || ("class " + target.index);
      var svg = chart(result, k, label);
      if (!svg) return;
      while (slot.firstChild) slot.removeChild(slot.firstChild);
      slot.appendChild(svg);
    });
  }

  fetch(api, { headers: { "Accept": "application/json" }, cache: "no-store",
               credentials: "same-origin" })
    .then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    })
    .then(draw)
    .catch(function () { /* the server-rendered charts stay */ });
})();
