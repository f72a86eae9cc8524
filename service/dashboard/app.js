// wbcache dashboard: polls the JSON API once a second and keeps the last five minutes of
// samples in memory for the charts. No dependencies, nothing loaded from elsewhere.
(function () {
  "use strict";

  const ROOT = (document.querySelector('meta[name="wbcache-root"]') || {}).content || "";
  const KEY_STORE = "wbcache.apiKey";
  const POLL_MS = 1000;
  const WINDOW_MS = 5 * 60 * 1000;
  const MIN_SPAN_MS = 30 * 1000;
  const REQUEST_TIMEOUT_MS = 10000;
  const DEAD_LETTER_PAGE = 100;

  const $ = (id) => document.getElementById(id);

  // -- the API ----------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch (e) {
      return "";
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) {
      /* storage disabled: the key lives until the page is closed */
    }
    memoryKey = key;
  }

  let memoryKey = storedKey();
  let authTrouble = null; // the last 401/403 seen during this round of requests

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (memoryKey) headers.Authorization = "Bearer " + memoryKey;
    const init = { method, headers, cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), REQUEST_TIMEOUT_MS);
    init.signal = ctl.signal;
    let res;
    try {
      res = await fetch(ROOT + path, init);
    } catch (e) {
      throw new HttpError(0, "unreachable", e.name === "AbortError" ? "timed out" : e.message);
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    try {
      data = await res.json();
    } catch (e) {
      data = null;
    }
    if (!res.ok) {
      const err = (data && data.error) || {};
      const failure = new HttpError(res.status, err.code || "http_" + res.status,
        err.message || res.statusText || "HTTP " + res.status);
      if (res.status === 401 || res.status === 403) authTrouble = failure;
      throw failure;
    }
    return data;
  }

  // -- formatting -------------------------------------------------------------------------

  const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const numFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });

  function fmtInt(v) {
    return v === null || v === undefined ? "—" : intFormat.format(v);
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "—";
    if (s < 10) return numFormat.format(Math.round(s * 100) / 100) + " s";
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }

  function fmtRatio(r) {
    return r === null || r === undefined ? "—" : numFormat.format(r * 100) + " %";
  }

  const pad = (n) => String(n).padStart(2, "0");

  function fmtTime(epochSeconds) {
    if (!epochSeconds) return "—";
    const d = new Date(epochSeconds * 1000);
    const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    if (d.toDateString() === new Date().toDateString()) return time;
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time;
  }

  function setValue(id, value, text) {
    const el = $(id);
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  // -- charts -----------------------------------------------------------------------------

  function cssVar(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 4, 6, 8, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  class Chart {
    constructor(canvas, opts) {
      this.canvas = canvas;
      this.opts = opts; // {field, color, format, fixedMax}
    }

    draw(samples, now) {
      const c = this.canvas;
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(100, c.clientWidth);
      const h = Math.max(60, c.clientHeight);
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr);
        c.height = Math.round(h * dpr);
      }
      const ctx = c.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, w, h);

      const field = this.opts.field;
      const points = samples.filter((s) => s[field] !== null && s[field] !== undefined);
      let max = 0;
      for (const s of points) max = Math.max(max, s[field]);
      const top = this.opts.fixedMax || Math.max(this.opts.minTop || 0, niceMax(max));
      const first = samples.length ? samples[0].t : now;
      const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, now - first));
      const left = 52, right = 10, topPad = 8, bottom = 20;
      const pw = w - left - right, ph = h - topPad - bottom;
      const x = (t) => left + ((t - (now - span)) / span) * pw;
      const y = (v) => topPad + ph - (Math.min(v, top) / top) * ph;

      const fg = cssVar("--muted", "#667");
      const grid = cssVar("--grid", "#e3e6ea");
      ctx.font = "11px system-ui, sans-serif";
      ctx.lineWidth = 1;
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      for (const frac of [0, 0.5, 1]) {
        const gy = Math.round(y(top * frac)) + 0.5;
        ctx.strokeStyle = grid;
        ctx.beginPath();
        ctx.moveTo(left, gy);
        ctx.lineTo(w - right, gy);
        ctx.stroke();
        ctx.fillStyle = fg;
        ctx.fillText(this.opts.format(top * frac), left - 6, gy);
      }
      ctx.textBaseline = "alphabetic";
      ctx.textAlign = "left";
      ctx.fillText("−" + Math.round(span / 1000) + " s", left, h - 4);
      ctx.textAlign = "right";
      ctx.fillText("now", w - right, h - 4);

      // The line, broken where a sample has no value; the area under it, lightly filled.
      const color = this.opts.color;
      const runs = [];
      let run = [];
      for (const s of samples) {
        const v = s[field];
        if (v === null || v === undefined) {
          if (run.length) runs.push(run);
          run = [];
        } else {
          run.push([x(s.t), y(v)]);
        }
      }
      if (run.length) runs.push(run);
      for (const r of runs) {
        ctx.beginPath();
        ctx.moveTo(r[0][0], y(0));
        for (const [px, py] of r) ctx.lineTo(px, py);
        ctx.lineTo(r[r.length - 1][0], y(0));
        ctx.closePath();
        ctx.globalAlpha = 0.15;
        ctx.fillStyle = color;
        ctx.fill();
        ctx.globalAlpha = 1;
        ctx.beginPath();
        r.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
        ctx.strokeStyle = color;
        ctx.lineWidth = 2;
        ctx.stroke();
        ctx.lineWidth = 1;
      }
      const last = points.length ? points[points.length - 1] : null;
      if (last) {
        ctx.fillStyle = color;
        ctx.beginPath();
        ctx.arc(x(last.t), y(last[field]), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
      // What a test (or a curious operator with devtools) can read back.
      c.dataset.points = String(points.length);
      c.dataset.max = String(max);
      c.dataset.last = last ? String(last[field]) : "";
    }
  }

  // -- state ------------------------------------------------------------------------------

  const samples = [];
  const charts = [];

  function addSample(s, t) {
    const prev = samples.length ? samples[samples.length - 1] : null;
    const sample = {
      t,
      pending: s.pending,
      lag: s.oldest_pending_age_s === null ? 0 : s.oldest_pending_age_s,
      flushed: s.flushed,
      hits: s.hits,
      misses: s.misses,
      flushRate: null,
      hitRatio: null,
    };
    if (prev) {
      const dt = (t - prev.t) / 1000;
      const df = s.flushed - prev.flushed;
      if (dt > 0 && df >= 0) sample.flushRate = df / dt;
      const dh = s.hits - prev.hits;
      const dm = s.misses - prev.misses;
      if (dh >= 0 && dm >= 0 && dh + dm > 0) sample.hitRatio = dh / (dh + dm);
    }
    samples.push(sample);
    while (samples.length && samples[0].t < t - WINDOW_MS) samples.shift();
  }

  function drawCharts() {
    const now = Date.now();
    for (const ch of charts) ch.draw(samples, now);
  }

  // -- rendering --------------------------------------------------------------------------

  function renderStats(s) {
    setValue("pending", s.pending, fmtInt(s.pending));
    setValue("lag", s.oldest_pending_age_s,
      s.oldest_pending_age_s === null ? "0 s" : fmtSeconds(s.oldest_pending_age_s));
    setValue("flush-rate", s.flush_rate_per_s, numFormat.format(s.flush_rate_per_s) + " /s");
    setValue("hit-ratio", s.hit_ratio, fmtRatio(s.hit_ratio));
    setValue("workers", s.workers, fmtInt(s.workers));
    setValue("dead-letters", s.dead_letters, fmtInt(s.dead_letters));
    $("dead-letters").classList.toggle("alarm", s.dead_letters > 0);
    $("workers").classList.toggle("alarm", s.workers === 0 && s.pending > 0);
    $("hit-ratio-hint").textContent = "hits, of " + fmtInt(s.hits + s.misses) + " reads";

    setValue("queued-jobs", s.queued_jobs, fmtInt(s.queued_jobs));
    setValue("batches-in-flight", s.batches_in_flight, fmtInt(s.batches_in_flight));
    setValue("flushed", s.flushed, fmtInt(s.flushed));
    setValue("flush-failures", s.flush_failures, fmtInt(s.flush_failures));
    setValue("hits-misses", s.hits + "/" + s.misses, fmtInt(s.hits) + " / " + fmtInt(s.misses));
    const err = s.last_flush_error;
    const errEl = $("last-flush-error");
    errEl.textContent = err ? err.error + " (" + fmtTime(err.at) + ")" : "none";
    errEl.classList.toggle("alarm", !!err);
    // The edge (docs/edge.md): purges waiting or retried while an edge is down.
    setValue("edge-purges-pending", s.edge_purges_pending, fmtInt(s.edge_purges_pending));
    setValue("edge-purges", s.edge_purges + "/" + s.edge_purge_failures,
      fmtInt(s.edge_purges) + " / " + fmtInt(s.edge_purge_failures));
    setValue("edge-purge-latency", s.edge_purge_latency_mean_s,
      s.edge_purge_latency_mean_s === null ? "—" : fmtSeconds(s.edge_purge_latency_mean_s));

    const list = $("worker-list");
    list.replaceChildren();
    const beats = Object.entries(s.worker_heartbeats || {}).sort((a, b) => a[1] - b[1]);
    for (const [id, ago] of beats) {
      const tr = document.createElement("tr");
      tr.dataset.worker = id;
      cell(tr, id, "mono");
      cell(tr, fmtSeconds(ago) + " ago", "num");
      list.appendChild(tr);
    }
    $("worker-note").textContent = beats.length
      ? ""
      : s.pending > 0
        ? "No live worker: pending writes wait until one runs (wbcache worker)."
        : "No live worker.";
  }

  // -- dead letters -----------------------------------------------------------------------

  let dlCursor = 0;
  let dlNext = null;
  let dlShown = 0;
  let dlSignature = "";

  function dlMessage(text, isError) {
    const el = $("dead-letter-message");
    el.textContent = text;
    el.classList.toggle("alarm", !!isError);
  }

  async function act(action, items, label) {
    const path = "/v1/dead-letters:" + action;
    try {
      const res = await api("POST", path, items ? { items } : undefined);
      const n = action === "retry" ? res.retried : res.dropped;
      dlMessage((action === "retry" ? "Retried " : "Dropped ") + n + " " + label + ".", false);
    } catch (e) {
      dlMessage("Could not " + action + " " + label + ": " + e.message, true);
    }
    dlSignature = "";
    await refreshNow();
  }

  function renderDeadLetters(page) {
    const items = page.items || [];
    const signature = JSON.stringify(
      items.map((i) => [i.collection, i.key, i.version, i.attempts, i.failed_at]));
    dlShown = items.length;
    dlNext = page.next_cursor || null;
    $("dead-letters-next").hidden = !dlNext;
    $("dead-letters-first").hidden = dlCursor === 0;
    $("dead-letter-note").textContent = page.total
      ? "showing " + items.length + " of " + page.total
      : "";
    $("dead-letters-retry-all").disabled = !page.total;
    $("dead-letters-drop-all").disabled = !page.total;
    if (signature === dlSignature) return; // keep the rows (and a click in progress) intact
    dlSignature = signature;
    const rows = $("dead-letter-rows");
    rows.replaceChildren();
    if (!items.length) {
      const tr = document.createElement("tr");
      const td = cell(tr, page.total ? "none on this page" : "No dead letters.", "muted");
      td.colSpan = 8;
      rows.appendChild(tr);
    }
    for (const item of items) {
      const tr = document.createElement("tr");
      tr.dataset.collection = item.collection;
      tr.dataset.key = item.key;
      tr.dataset.version = String(item.version);
      cell(tr, item.collection, "mono nowrap");
      cell(tr, item.key, "mono key");
      cell(tr, String(item.version), "num mono nowrap");
      cell(tr, item.sqlstate || "—", "mono nowrap");
      const errTd = cell(tr, item.error || "", "error");
      errTd.title = item.error || "";
      cell(tr, String(item.attempts), "num");
      cell(tr, fmtTime(item.failed_at), "nowrap");
      const actions = cell(tr, "", "row-actions");
      const ref = [{ collection: item.collection, key: item.key }];
      const label = item.collection + "/" + item.key;
      const retry = document.createElement("button");
      retry.type = "button";
      retry.className = "retry";
      retry.textContent = "Retry";
      retry.addEventListener("click", () => {
        retry.disabled = drop.disabled = true;
        act("retry", ref, label);
      });
      const drop = document.createElement("button");
      drop.type = "button";
      drop.className = "drop danger";
      drop.textContent = "Drop";
      drop.addEventListener("click", () => {
        const ok = window.confirm(
          "Drop the write to " + label + " (version " + item.version + ")?\n\n" +
          "It is discarded for good; reads will show what Postgres has.");
        if (!ok) return;
        retry.disabled = drop.disabled = true;
        act("drop", ref, label);
      });
      actions.append(retry, drop);
      rows.appendChild(tr);
    }
  }

  async function loadDeadLetters() {
    const q = "?cursor=" + encodeURIComponent(dlCursor) + "&limit=" + DEAD_LETTER_PAGE;
    const page = await api("GET", "/v1/dead-letters" + q);
    if (dlCursor !== 0 && !(page.items || []).length && page.total) {
      dlCursor = 0; // the page we were on emptied: back to the first
      return loadDeadLetters();
    }
    renderDeadLetters(page);
  }

  // -- configuration ----------------------------------------------------------------------

  let configLoaded = false;

  async function loadConfig() {
    const cfg = await api("GET", "/v1/config");
    const box = $("config");
    box.replaceChildren();
    for (const name of Object.keys(cfg).sort()) {
      const row = document.createElement("div");
      row.className = "setting";
      row.dataset.setting = name;
      const k = document.createElement("span");
      k.className = "name mono";
      k.textContent = name.toUpperCase();
      const v = document.createElement("span");
      v.className = "val mono";
      const value = cfg[name];
      v.textContent = typeof value === "string" ? (value === "" ? '""' : value)
        : JSON.stringify(value);
      row.append(k, v);
      box.appendChild(row);
    }
    configLoaded = true;
  }

  // -- the loop ---------------------------------------------------------------------------

  function setStatus(kind, text) {
    const el = $("status");
    el.className = "status status-" + kind;
    el.textContent = text;
  }

  let authRequested = false; // the operator opened the key form to change the key

  function showAuth() {
    const box = $("auth");
    if (!authTrouble) {
      box.hidden = !authRequested;
      $("auth-message").textContent = memoryKey
        ? "A key is in use for this tab. Enter another, or forget it."
        : "No key in use.";
      $("api-key-change").hidden = !memoryKey || !box.hidden;
      return;
    }
    box.hidden = false;
    $("api-key-change").hidden = true;
    const why = authTrouble.status === 401
      ? (memoryKey ? "The API did not accept this key: " : "This API needs a key: ")
      : "This key's scope does not allow everything here: ";
    $("auth-message").textContent = why + authTrouble.message;
  }

  let timer = null;
  let running = false;

  async function tick() {
    running = true;
    const started = Date.now();
    authTrouble = null;
    let statsOk = false;
    try {
      const s = await api("GET", "/v1/stats");
      addSample(s, Date.now());
      renderStats(s);
      statsOk = true;
      setStatus("ok", "live");
      $("updated").textContent = "updated " + new Date().toLocaleTimeString(undefined,
        { hour12: false });
      if (s.dead_letters > 0 || dlShown > 0 || dlCursor !== 0) {
        try {
          await loadDeadLetters();
        } catch (e) {
          $("dead-letter-note").textContent = "cannot list dead letters: " + e.message;
        }
      } else {
        renderDeadLetters({ items: [], next_cursor: null, total: 0 });
      }
      if (!configLoaded) {
        try {
          await loadConfig();
        } catch (e) {
          /* shown through the auth box or the status on the next round */
        }
      }
    } catch (e) {
      if (e.status === 401 || e.status === 403) setStatus("wait", "needs an API key");
      else setStatus("down", "API unreachable: " + e.message);
    }
    if (!statsOk) $("updated").textContent = "";
    showAuth();
    drawCharts();
    running = false;
    timer = setTimeout(tick, Math.max(100, POLL_MS - (Date.now() - started)));
  }

  async function refreshNow() {
    if (running) return; // the round in progress will show it
    clearTimeout(timer);
    await tick();
  }

  function init() {
    charts.push(
      new Chart($("chart-pending"), {
        field: "pending", color: "#2563eb", minTop: 2, format: fmtInt }),
      new Chart($("chart-lag"), {
        field: "lag", color: "#d97706", format: (v) => numFormat.format(v) + " s" }),
      new Chart($("chart-flush-rate"), {
        field: "flushRate", color: "#059669", format: (v) => numFormat.format(v) }),
      new Chart($("chart-hit-ratio"), {
        field: "hitRatio", color: "#7c3aed", fixedMax: 1,
        format: (v) => Math.round(v * 100) + " %" }),
    );
    $("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = $("api-key");
      storeKey(input.value.trim());
      input.value = "";
      authRequested = false;
      configLoaded = false;
      dlSignature = "";
      refreshNow();
    });
    $("api-key-forget").addEventListener("click", () => {
      storeKey("");
      authRequested = false;
      configLoaded = false;
      refreshNow();
    });
    $("api-key-change").addEventListener("click", () => {
      authRequested = true;
      showAuth();
      $("api-key").focus();
    });
    $("dead-letters-retry-all").addEventListener("click", () => {
      act("retry", null, "all dead letters");
    });
    $("dead-letters-drop-all").addEventListener("click", () => {
      if (window.confirm("Drop ALL dead letters? Their writes are discarded for good.")) {
        act("drop", null, "all dead letters");
      }
    });
    $("dead-letters-next").addEventListener("click", () => {
      if (dlNext) dlCursor = dlNext;
      refreshNow();
    });
    $("dead-letters-first").addEventListener("click", () => {
      dlCursor = 0;
      refreshNow();
    });
    $("config-reload").addEventListener("click", () => {
      configLoaded = false;
      refreshNow();
    });
    window.addEventListener("resize", drawCharts);
    // For tests and the curious: the samples behind the charts.
    window.wbDashboard = { samples, refresh: refreshNow };
    tick();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
