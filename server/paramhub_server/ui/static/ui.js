// paramhub web inspector: live updates (Server-Sent Events), drawings (canvas) and edits.
// No dependencies and nothing fetched from elsewhere; the page says which part runs through
// <body data-page>, and hands its data over in <script type="application/json" id="page-data">.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const enc = encodeURIComponent;

  function pageData() {
    const el = $("page-data");
    return el ? JSON.parse(el.textContent) : {};
  }

  function fmt(x) {
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return x.toLocaleString("en-US");
    return Math.abs(x) >= 1e-4 && Math.abs(x) < 1e6 ? x.toPrecision(6) : x.toExponential(4);
  }

  function flash(el) {
    el.classList.remove("flash");
    void el.offsetWidth;  // restart the animation
    el.classList.add("flash");
  }

  // One EventSource per page; the browser reconnects on its own after an error.
  function live(url, handlers) {
    const es = new EventSource(url);
    const dot = $("live");
    es.onopen = () => { dot.className = "live on"; };
    es.onerror = () => { dot.className = "live off"; };
    for (const [name, fn] of Object.entries(handlers)) {
      // (the browser's own "error" event, a lost connection, carries no data)
      es.addEventListener(name, (e) => { if (e.data !== undefined) fn(JSON.parse(e.data)); });
    }
    // A model that is gone (deleted) ends the stream for good: no reconnecting every 2 s.
    es.addEventListener("error", (e) => {
      if (e.data === undefined) return;
      const d = JSON.parse(e.data);
      if (d.code === "NOT_FOUND" && !d.key) {
        es.close();
        dot.className = "live off";
        dot.textContent = `${d.model}: ${d.reason}`;
      }
    });
    window.addEventListener("pagehide", () => es.close());
    return es;
  }

  async function post(url, body) {
    let r;
    try {
      r = await fetch(url, {
        method: "POST", credentials: "same-origin", body: JSON.stringify(body),
        headers: {"content-type": "application/json", "x-csrf-token": csrf},
      });
    } catch (e) {
      return {ok: false, code: "NETWORK", reason: "", message: String(e)};
    }
    try {
      return await r.json();
    } catch (e) {
      return {ok: false, code: "HTTP_" + r.status, reason: "", message: r.statusText};
    }
  }

  function showResult(data, okText) {
    const el = $("edit-result");
    if (data.ok) {
      el.className = "result ok";
      el.textContent = okText(data);
    } else if (data.code === "ABORTED") {
      el.className = "result stale";
      el.textContent = `refused as stale (${data.reason}): ${data.message}. ` +
        "Nothing was written; the page shows the current values again.";
    } else {
      el.className = "result error";
      el.textContent = `refused: ${data.code} ${data.reason}: ${data.message}`;
    }
  }

  function formValues(form) {
    const out = {};
    for (const [k, v] of new FormData(form).entries()) if (k !== "csrf") out[k] = v;
    return out;
  }

  // Replaces elements of this page by the same elements of a fresh copy of it.
  async function refetch(ids) {
    const r = await fetch(location.href, {credentials: "same-origin"});
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    for (const id of ids) {
      const fresh = doc.getElementById(id), old = $(id);
      if (fresh && old) old.replaceWith(document.adoptNode(fresh));
    }
  }

  // ------------------------------------------------------------------------------ drawing

  const num = (x) => (typeof x === "number" ? x : NaN);

  function clear(canvas) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.font = "11px ui-monospace, monospace";
    return ctx;
  }

  function drawHist(canvas, hist) {
    const ctx = clear(canvas);
    const counts = hist.counts || [];
    if (!counts.length) return;
    const W = canvas.width, H = canvas.height - 16, top = Math.max(...counts) || 1;
    const bw = W / counts.length;
    ctx.fillStyle = "#3b7dd8";
    counts.forEach((n, i) => {
      const h = n ? Math.max(1, (H - 14) * n / top) : 0;
      ctx.fillRect(i * bw + 0.5, H - h, Math.max(1, bw - 1), h);
    });
    ctx.fillStyle = "#555";
    ctx.textBaseline = "top";
    ctx.fillText(fmt(num(hist.min)), 2, H + 3);
    const hi = fmt(num(hist.max));
    ctx.fillText(hi, W - ctx.measureText(hi).width - 2, H + 3);
    ctx.fillText(`max bin ${fmt(top)}`, 2, 0);
  }

  // The histograms of the last versions, oldest at the top, on one value axis.
  function drawRidge(canvas, history) {
    const ctx = clear(canvas);
    const rows = history.filter((p) => (p.hist.counts || []).length &&
      isFinite(num(p.hist.min)) && isFinite(num(p.hist.max)));
    if (!rows.length) return;
    const lo = Math.min(...rows.map((p) => p.hist.min));
    const hi = Math.max(...rows.map((p) => p.hist.max));
    const span = hi - lo || 1;
    const W = canvas.width, H = canvas.height - 14, left = 0;
    const step = Math.min(16, (H - 60) / Math.max(rows.length - 1, 1));
    const amp = 40;
    rows.forEach((p, i) => {
      const counts = p.hist.counts, top = Math.max(...counts) || 1;
      const bw = (p.hist.max - p.hist.min) / counts.length;
      const base = H - 2 - (rows.length - 1 - i) * step;  // the newest at the bottom
      const x = (v) => left + (W - left) * (v - lo) / span;
      ctx.beginPath();
      ctx.moveTo(x(p.hist.min), base);
      counts.forEach((n, j) => ctx.lineTo(x(p.hist.min + (j + 0.5) * bw), base - amp * n / top));
      ctx.lineTo(x(p.hist.max), base);
      ctx.closePath();
      const shade = Math.round(230 - 150 * (i + 1) / rows.length);
      ctx.fillStyle = `rgb(${shade}, ${shade + 10}, 250)`;
      ctx.fill();
      ctx.strokeStyle = "#1d4f91";
      ctx.lineWidth = 1;
      ctx.stroke();
    });
    ctx.fillStyle = "#555";
    ctx.textBaseline = "top";
    ctx.fillText(fmt(lo), 2, H + 2);
    const hiText = fmt(hi);
    ctx.fillText(hiText, W - ctx.measureText(hiText).width - 2, H + 2);
    const first = `v${rows[0].version} (top) … v${rows[rows.length - 1].version} (bottom)`;
    ctx.fillText(first, 2, 2);
  }

  function drawSpark(canvas, history) {
    const ctx = clear(canvas);
    const ys = history.map((p) => num(p.norm)).filter(isFinite);
    if (ys.length < 1) return;
    const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
    const W = canvas.width - 110, H = canvas.height;
    ctx.strokeStyle = "#c0392b";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ys.forEach((y, i) => {
      const px = ys.length > 1 ? (W * i) / (ys.length - 1) : W / 2;
      const py = H - 4 - (H - 8) * (y - lo) / span;
      if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.stroke();
    ctx.fillStyle = "#555";
    ctx.textBaseline = "middle";
    ctx.fillText(`norm ${fmt(ys[ys.length - 1])}`, W + 8, H / 2);
  }

  function lerp(a, b, t) { return a.map((v, i) => Math.round(v + (b[i] - v) * t)); }

  function color(v, lo, hi) {
    if (typeof v !== "number") return "rgb(255,0,255)";  // NaN / inf
    if (lo < 0 && hi > 0) {
      const m = Math.max(-lo, hi), t = v / m;
      return "rgb(" + (t < 0 ? lerp([247, 247, 247], [33, 102, 172], -t)
        : lerp([247, 247, 247], [178, 24, 43], t)).join(",") + ")";
    }
    const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    return "rgb(" + (t < 0.5 ? lerp([68, 1, 84], [33, 145, 140], t * 2)
      : lerp([33, 145, 140], [253, 231, 37], (t - 0.5) * 2)).join(",") + ")";
  }

  // 1-row regions wrap into a square-ish block so that they stay visible.
  function grid(region) {
    let rows = region.rows;
    if (rows.length === 1 && rows[0].length > 64) {
      const flat = rows[0], w = Math.ceil(Math.sqrt(flat.length));
      rows = [];
      for (let i = 0; i < flat.length; i += w) rows.push(flat.slice(i, i + w));
    }
    return rows;
  }

  function drawHeat(canvas, region) {
    const rows = grid(region);
    const R = rows.length, C = Math.max(...rows.map((r) => r.length), 1);
    const cell = Math.max(1, Math.floor(360 / Math.max(R, C)));
    canvas.width = C * cell;
    canvas.height = R * cell;
    const ctx = canvas.getContext("2d");
    rows.forEach((r, i) => r.forEach((v, j) => {
      ctx.fillStyle = color(v, region.lo, region.hi);
      ctx.fillRect(j * cell, i * cell, cell, cell);
    }));
    canvas.onmousemove = (e) => {
      const b = canvas.getBoundingClientRect();
      const i = Math.floor((e.clientY - b.top) / cell), j = Math.floor((e.clientX - b.left) / cell);
      if (rows[i] && j < rows[i].length) canvas.title = `row ${i}, col ${j}: ${fmt(rows[i][j])}`;
    };
    $("heat-legend").textContent = region.lo < 0 && region.hi > 0
      ? `blue ${fmt(region.lo)} · white 0 · red ${fmt(region.hi)}`
      : `purple ${fmt(region.lo)} → yellow ${fmt(region.hi)}`;
  }

  const PAGE_ROWS = 32, MAX_COLS = 32;

  function drawTable(table, region, page) {
    let rows = region.rows, labels, cols;
    const vector = rows.length === 1 && rows[0].length > 16;
    if (vector) {  // a vector: 16 to a row
      const flat = rows[0];
      rows = [];
      labels = [];
      for (let i = 0; i < flat.length; i += 16) { rows.push(flat.slice(i, i + 16)); labels.push(i); }
      cols = 16;
    } else {
      labels = rows.map((_, i) => i);
      cols = Math.min(MAX_COLS, Math.max(...rows.map((r) => r.length), 1));
    }
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
    page = Math.min(Math.max(page, 0), pages - 1);
    table.replaceChildren();
    const head = table.createTHead().insertRow();
    head.insertCell().textContent = "";
    for (let j = 0; j < cols; j++) head.insertCell().textContent = vector ? `+${j}` : String(j);
    const body = table.createTBody();
    for (let i = page * PAGE_ROWS; i < Math.min(rows.length, (page + 1) * PAGE_ROWS); i++) {
      const tr = body.insertRow();
      const th = document.createElement("th");
      th.textContent = labels[i];
      tr.appendChild(th);
      for (let j = 0; j < cols; j++) {
        const td = tr.insertCell();
        const v = rows[i][j];
        td.textContent = v === undefined ? "" : (typeof v === "number" ? +v.toPrecision(5) + "" : v);
        td.className = "num";
      }
    }
    const hidden = !vector && Math.max(...region.rows.map((r) => r.length)) > cols;
    $("page-info").textContent = `page ${page + 1} / ${pages}` +
      (hidden ? ` · first ${cols} columns` : "");
    return page;
  }

  // ------------------------------------------------------------------------------ pages

  function indexPage() {
    const spans = [...document.querySelectorAll(".model-version")];
    if (!spans.length) return;
    live("/api/events?" + spans.map((s) => "model=" + enc(s.dataset.model)).join("&"), {
      model: (d) => spans.filter((s) => s.dataset.model === d.model).forEach((s) => {
        if (s.textContent !== String(d.model_version)) flash(s);
        s.textContent = d.model_version;
      }),
    });
  }

  function modelPage() {
    const pd = pageData();
    let version = pd.version;
    const setVersion = (v) => {
      version = v;
      $("model-version").textContent = v;
      document.querySelectorAll(".expect-model").forEach((e) => { e.textContent = v; });
    };
    live(`/api/models/${enc(pd.model)}/events`, {
      model: (d) => {
        if (d.model_version !== version) flash($("model-version"));
        setVersion(d.model_version);
        if (d.op) $("last-op").textContent = `last write: ${d.op}`;
        const cells = [...document.querySelectorAll(".tv")];
        for (const c of d.changes) {
          cells.filter((el) => el.dataset.first === c.name).forEach((el) => {
            el.textContent = c.version;
            flash(el);
          });
        }
        if (d.op === "set_training" || d.op === "restore_checkpoint") refetch(["tree"]);
      },
      resync: () => refetch(["tree", "model-version"]),
    });
    const init = $("init-form");
    if (init) init.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = formValues(init);
      const body = {glob: f.glob, scheme: f.scheme, args: f.args, expected_model_version: version};
      if (f.seed) body.seed = parseInt(f.seed, 10);
      showResult(await post(`/api/models/${enc(pd.model)}/apply_init`, body),
        (d) => `${f.scheme} on ${f.glob}: model version ${d.model_version}`);
    });
    const ck = $("checkpoint-form");
    if (ck) ck.addEventListener("submit", async (e) => {
      e.preventDefault();
      const name = formValues(ck).name;
      const d = await post(`/api/models/${enc(pd.model)}/checkpoints`, {name});
      showResult(d, (d) => `checkpoint ${d.name} saved at model version ${d.model_version}`);
      if (d.ok) refetch(["checkpoints"]).then(bindRestore);
    });
    const bindRestore = () => document.querySelectorAll("button.restore").forEach((b) => {
      b.onclick = async () => {
        showResult(await post(`/api/models/${enc(pd.model)}/checkpoints/restore`,
          {name: b.dataset.name, expected_model_version: version}),
        (d) => `restored ${b.dataset.name}: model version ${d.model_version}`);
      };
    });
    bindRestore();
  }

  function tensorPage() {
    const pd = pageData();
    let tv = pd.version, mv = pd.model_version, latest = null, latestMV = mv, history = [];
    let region = null, page = 0, lastLoad = 0, loadTimer = null;
    const follow = $("follow");
    const base = `/api/models/${enc(pd.model)}/${pd.kind}/${enc(pd.name)}`;

    const setTV = (v) => {
      if (v !== tv) flash($("tensor-version"));
      tv = v;
      $("tensor-version").textContent = v;
      document.querySelectorAll(".expect-tensor").forEach((e) => { e.textContent = v; });
    };
    const setMV = (v) => {
      mv = v;
      $("model-version").textContent = v;
      document.querySelectorAll(".expect-model").forEach((e) => { e.textContent = v; });
    };
    const showStats = (s) => {
      document.querySelectorAll("[data-stat]").forEach((td) => {
        const v = s[td.dataset.stat];
        if (v !== undefined) td.textContent = fmt(v);
      });
      drawHist($("hist"), s.hist);
      $("hist-range").textContent = `${(s.hist.counts || []).length} bins`;
    };
    const showHistory = () => {
      drawRidge($("ridge"), history);
      drawSpark($("spark"), history);
      $("ridge-range").textContent = history.length ? `${history.length} versions` : "";
    };

    async function loadValues() {
      lastLoad = Date.now();
      const q = `index=${enc($("index").value)}&grad=${pd.grad ? 1 : 0}&v=${tv}`;
      const r = await fetch(`${base}/values?${q}`, {credentials: "same-origin"});
      const d = await r.json();
      if (d.ok === false) {
        $("values-error").textContent = `${d.code} ${d.reason}: ${d.message}`;
        return;
      }
      $("values-error").textContent = "";
      region = d;
      $("region-info").textContent = `${d.dtype} ${JSON.stringify(d.shape)} at version ${d.version}`;
      drawHeat($("heat"), d);
      page = drawTable($("values"), d, page);
    }
    // At most one values read a second per page (the event stream may be faster).
    function scheduleValues() {
      if (loadTimer) return;
      const wait = Math.max(0, 1000 - (Date.now() - lastLoad));
      loadTimer = setTimeout(() => { loadTimer = null; loadValues(); }, wait);
    }
    const apply = (d) => {
      setTV(d.version);
      setMV(Math.max(d.model_version, latestMV));
      showStats(d);
      showHistory();
      scheduleValues();
    };

    showStats(pd.stats);
    loadValues();
    live(`${base.replace(`/${pd.kind}/${enc(pd.name)}`, "")}/events?name=${enc(pd.name)}` +
         `&kind=${pd.kind}&grad=${pd.grad ? 1 : 0}`, {
      model: (d) => { latestMV = d.model_version; if (follow.checked) setMV(latestMV); },
      stats: (d) => {
        if (d.history) history = d.history.slice();
        else if (d.point) {
          if (history.length && history[history.length - 1].version === d.point.version) history.pop();
          history.push(d.point);
          if (history.length > 48) history.shift();
        }
        latest = d;
        if (follow.checked) apply(d);
      },
      resync: () => { if (follow.checked) loadValues(); },
      error: (d) => { $("values-error").textContent = `${d.code} ${d.reason}: ${d.message}`; },
    });
    follow.addEventListener("change", () => { if (follow.checked && latest) apply(latest); });
    // After a refused (stale) edit: follow again and show the current values at once.
    function catchUp() {
      follow.checked = true;
      if (latest) apply(latest);
      loadValues();
    }
    $("prev").onclick = () => { if (region) page = drawTable($("values"), region, page - 1); };
    $("next").onclick = () => { if (region) page = drawTable($("values"), region, page + 1); };

    const set = $("set-form");
    if (set) set.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = formValues(set);
      const d = await post(`/api/models/${enc(pd.model)}/set_slice`, {
        kind: pd.kind, name: pd.name, index: f.index, value: f.value, expected_version: tv});
      showResult(d, (d) => `${pd.name}[${f.index || ":"}] = ${f.value}: version ${d.version}`);
      if (!d.ok && d.code === "ABORTED") catchUp();
    });
    const init = $("init-form");
    if (init) init.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = formValues(init);
      const body = {name: pd.name, scheme: f.scheme, args: f.args, expected_model_version: mv};
      if (f.seed) body.seed = parseInt(f.seed, 10);
      const d = await post(`/api/models/${enc(pd.model)}/apply_init`, body);
      showResult(d, (d) => `${f.scheme}: model version ${d.model_version}`);
      if (!d.ok && d.code === "ABORTED") catchUp();
    });
  }

  const pages = {index: indexPage, model: modelPage, tensor: tensorPage};
  document.addEventListener("DOMContentLoaded", () => {
    const run = pages[document.body.dataset.page];
    if (run) run();
  });
})();
