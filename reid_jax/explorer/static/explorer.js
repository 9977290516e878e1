// The explorer page: talks to the JSON API of reid_jax/explorer/app.py and draws what it
// answers. Every text from the server goes into the page through textContent (never as HTML);
// images are requested by index or upload id. No framework, no build step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const PIE_SLICES = 7;          // as reid_jax/explain/figures.py draws the report's pies
  const MIN_SLICE_SHARE = 0.03;
  const LISTED_NEGATIVES = 8;

  const state = {
    info: null, query: null, k: 10, threshold: null, mode: "paper",
    ignore: new Set(), require: new Set(), forbid: new Set(),
    chosen: null, result: null, pending: 0,
  };
  let rankController = null;
  let metricsController = null;
  let refreshTimer = null;
  let searchTimer = null;

  function el(tag, props = {}, ...children) {
    const e = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") e.className = value;
      else if (key === "text") e.textContent = value;
      else if (key.includes("-") || key === "title" || key === "role") {
        e.setAttribute(key, value);
      } else e[key] = value;
    }
    for (const child of children) if (child != null) e.append(child);
    return e;
  }

  function svg(tag, attributes) {
    const e = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes)) e.setAttribute(key, value);
    return e;
  }

  function busy(delta) {
    state.pending += delta;
    document.body.dataset.busy = state.pending > 0 ? "1" : "0";
  }

  async function api(url, options = {}) {
    busy(1);
    try {
      const response = await fetch(url, options);
      let body = null;
      try { body = await response.json(); } catch (e) { body = null; }
      if (!response.ok) {
        const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
        error.parameter = body && body.parameter;
        throw error;
      }
      return body;
    } finally {
      busy(-1);
    }
  }

  function showError(message) {
    const status = $("status");
    status.textContent = message;
    status.hidden = !message;
    clearTimeout(showError.timer);
    if (message) showError.timer = setTimeout(() => { status.hidden = true; }, 8000);
  }

  const pct = (x, digits = 1) => (x == null ? "–" : `${(100 * x).toFixed(digits)} %`);
  const clip = (s) => Math.min(Math.max(s, 0), 1);
  const scorePercent = (s) => (100 * clip(s)).toFixed(0);
  const scoreColor = (s) => `hsl(${(120 * clip(s)).toFixed(0)},62%,${(86 - 6 * clip(s)).toFixed(0)}%)`;
  const fmt = (x) => (Math.abs(x) >= 0.01 || x === 0 ? x.toFixed(3) : x.toExponential(2));
  const color = (name) => (state.info.attributes.find((a) => a.name === name) || {}).color || "#d1d3d9";

  function queryImage(query) {
    return query.kind === "upload"
      ? `/api/image/upload/${encodeURIComponent(query.key)}`
      : `/api/image/query/${Number(query.key)}`;
  }

  // ------------------------------------------------------------------ parameters

  function steeringParams(p) {
    for (const key of ["ignore", "require", "forbid"]) {
      if (state[key].size) p.set(key, [...state[key]].sort().join(","));
    }
    return p;
  }

  function rankParams() {
    const p = new URLSearchParams();
    p.set("k", String(state.k));
    if (state.threshold != null) p.set("threshold", state.threshold.toFixed(2));
    p.set("mode", state.mode);
    return steeringParams(p);
  }

  const steered = () => state.ignore.size + state.require.size + state.forbid.size > 0;

  // ------------------------------------------------------------------ set-up

  async function init() {
    const info = await api("/api/info");
    state.info = info;
    state.k = info.defaults.k;
    state.mode = info.defaults.mode;
    const t = info.defaults.threshold;
    state.threshold = typeof t === "number" ? t : null;

    const run = $("run-info");
    run.append(el("span", { text: `${info.num_gallery.toLocaleString()} gallery images, ` +
      `${info.num_queries.toLocaleString()} queries, N = ${info.embedding_dim}` }));
    if (info.summary) {
      run.append(" · mAP ", el("b", { text: pct(info.summary.mAP) }),
        " · rank-1 ", el("b", { text: pct(info.summary.rank1) }));
    }

    const kSelect = $("k");
    const ks = [...new Set([1, 3, 5, 10, 15, 20, 30, 50, 100, state.k])]
      .filter((k) => k <= info.max_k).sort((a, b) => a - b);
    for (const k of ks) kSelect.append(el("option", { value: String(k), text: String(k) }));
    kSelect.value = String(state.k);
    kSelect.addEventListener("change", () => { state.k = Number(kSelect.value); refresh(); });

    const slider = $("threshold");
    slider.value = state.threshold == null ? "0.4" : String(state.threshold);
    $("threshold-value").textContent = state.threshold == null ? "per attribute"
      : state.threshold.toFixed(2);
    slider.addEventListener("input", () => {
      state.threshold = Number(slider.value);
      $("threshold-value").textContent = state.threshold.toFixed(2);
      scheduleRefresh(30);
    });

    const modes = $("modes");
    for (const mode of info.modes) {
      const input = el("input", { type: "radio", name: "mode", value: mode.name,
                                  checked: mode.name === state.mode });
      const label = el("label", { class: mode.name === state.mode ? "active" : "",
                                  title: mode.equation, "data-mode": mode.name },
                       input, mode.name);
      input.addEventListener("change", () => {
        state.mode = mode.name;
        for (const l of modes.querySelectorAll("label")) {
          l.classList.toggle("active", l.dataset.mode === mode.name);
        }
        refresh();
      });
      modes.append(label);
    }

    buildSteering();
    $("order").addEventListener("change", () => loadQueries());
    $("search").addEventListener("input", () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(loadQueries, 150);
    });
    const upload = $("upload");
    if (!info.uploads) {
      upload.disabled = true;
      $("upload-message").textContent = "Uploads need the model; this server was started " +
        "without one.";
    }
    upload.addEventListener("change", () => uploadImage(upload));
    drawRules();
    const first = await loadQueries();
    if (first) selectQuery({ kind: "query", key: first.index });
  }

  function drawRules() {
    const rules = $("rules");
    rules.replaceChildren();
    const list = el("ul");
    const info = state.info;
    const mode = info.modes.find((m) => m.name === state.mode);
    for (const text of [info.rules.confident_attributes, info.rules.absent,
      info.rules.matching_scores, info.rules.frames, mode ? mode.rule : null]) {
      if (text) list.append(el("li", { text }));
    }
    list.append(el("li", { text: "Steering: an ignored attribute's direction is removed " +
      "from query and gallery embeddings before ranking (its head logit becomes 0; " +
      "information correlated with it elsewhere in the embedding remains). Distances and " +
      "error compositions are those of the steered embeddings; probabilities and matching " +
      "scores are the head's reading of the images themselves. Arrows: rank before steering." }));
    rules.append(list);
  }

  // ------------------------------------------------------------------ queries

  async function loadQueries() {
    const p = new URLSearchParams({ order: $("order").value, limit: "300" });
    const search = $("search").value.trim();
    if (search) p.set("search", search);
    let data;
    try {
      data = await api(`/api/queries?${p}`);
    } catch (e) {
      showError(e.message);
      return null;
    }
    const list = $("query-list");
    list.replaceChildren();
    for (const q of data.queries) {
      const bad = q.ap != null && q.ap < 0.5;
      const item = el("li", { "data-index": String(q.index), title: `id ${q.pid}, camera ${q.camera}` },
        el("img", { src: `/api/image/query/${q.index}`, alt: "", loading: "lazy" }),
        el("div", {},
          el("div", { class: "name", text: q.file }),
          el("div", { class: bad ? "ap bad" : "ap",
                      text: `AP ${pct(q.ap)} · first match ${q.first_match_rank ?? "none"}` })));
      if (state.query && state.query.kind === "query" && state.query.key === q.index) {
        item.classList.add("active");
      }
      item.addEventListener("click", () => selectQuery({ kind: "query", key: q.index }));
      list.append(item);
    }
    $("query-count").textContent = `${data.queries.length} of ${data.total} queries` +
      (search ? ` matching "${search}"` : "");
    return data.queries[0] || null;
  }

  function selectQuery(query) {
    state.query = query;
    state.chosen = null;
    for (const li of $("query-list").children) {
      li.classList.toggle("active", query.kind === "query" && Number(li.dataset.index) === query.key);
    }
    refresh();
  }

  // ------------------------------------------------------------------ ranking

  function scheduleRefresh(delay) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, delay);
  }

  async function refresh() {
    clearTimeout(refreshTimer);
    if (!state.query) return;
    const p = rankParams();
    p.set(state.query.kind === "upload" ? "upload" : "query", String(state.query.key));
    if (rankController) rankController.abort();
    rankController = new AbortController();
    $("result").classList.add("busy");
    try {
      const result = await api(`/api/rank?${p}`, { signal: rankController.signal });
      state.result = result;
      render(result);
      $("result").classList.remove("busy");
    } catch (e) {
      if (e.name === "AbortError") return;
      $("result").classList.remove("busy");
      showError(e.message);
    }
    refreshMetrics();
  }

  function render(r) {
    const gal = r.gallery;
    const info = $("query-info");
    info.replaceChildren();
    if (r.upload) {
      info.append(el("b", { text: `your image: ${r.query.file}` }),
        el("span", { class: "muted", text: " · identity unknown: no true/false frames, no AP" }));
    } else {
      info.append(el("b", { text: r.query.file }),
        el("span", { text: ` · id ${r.query.pid} · camera ${r.query.camera}` }));
    }
    drawMetrics(r);

    const ranking = $("ranking");
    ranking.replaceChildren();
    const qtile = el("div", { class: "tile query-tile" },
      el("span", { class: "thumb query" }, el("img", { src: queryImage(state.query), alt: "query" })),
      el("span", { class: "rk", text: "query" }));
    ranking.append(qtile);
    const n = gal.index.length;
    for (let i = 0; i < n; i++) {
      const match = gal.true_match == null ? "unknown" : (gal.true_match[i] ? "hit" : "miss");
      const tile = el("div", { class: "tile", "data-rank": String(i + 1),
                               "data-gallery": String(gal.index[i]), "data-match": match,
                               title: `${gal.file[i]} · id ${gal.pid[i]} · camera ${gal.camera[i]}` },
        el("span", { class: `thumb ${match}` },
          el("img", { src: `/api/image/gallery/${gal.index[i]}`, alt: gal.file[i] })),
        el("span", { class: "rk", text: `#${i + 1}` }),
        el("span", { class: "sub", text: `d² ${gal.distance[i].toFixed(3)}` }));
      if (r.previous_ranks) {
        const before = r.previous_ranks[i];
        const delta = before - (i + 1);
        const move = el("span", {
          class: `move ${delta > 0 ? "up" : delta < 0 ? "down" : "same"}`,
          title: `rank before steering: ${before}`,
          text: delta > 0 ? `▲${delta}` : delta < 0 ? `▼${-delta}` : "=",
        });
        tile.append(move);
      }
      if (state.chosen === i + 1) tile.classList.add("chosen");
      tile.addEventListener("click", () => { state.chosen = i + 1; drawChosen(); });
      ranking.append(tile);
    }
    $("empty").hidden = n > 0;
    drawScores(r);
    drawProbabilities(r);
    drawChosen();
  }

  function drawMetrics(r) {
    const box = $("metrics");
    box.replaceChildren();
    if (r.upload) return;
    const first = (x) => (x == null ? "none" : `rank ${x}`);
    const ap = el("span", { "data-metric": "query-ap", text: `this query: AP ${pct(r.ap)}` });
    const fm = el("span", { text: `first match ${first(r.first_match_rank)}` });
    if (r.unsteered) {
      ap.append(` (before ${pct(r.unsteered.ap)})`);
      if (r.ap != null && r.unsteered.ap != null && r.ap !== r.unsteered.ap) {
        ap.className = r.ap > r.unsteered.ap ? "better" : "worse";
      }
      fm.append(` (before ${first(r.unsteered.first_match_rank)})`);
    }
    box.append(ap, fm);
    if (r.steering.active) {
      box.append(el("span", { text: `gallery kept: ${r.steering.gallery_kept.toLocaleString()}` }));
    }
    box.append(el("span", { id: "split-metrics", class: "muted" }));
  }

  async function refreshMetrics() {
    const target = $("split-metrics");
    if (!target || !state.info.summary) return;
    const base = state.info.summary;
    if (!steered()) {
      target.textContent = `all queries: mAP ${pct(base.mAP)} · rank-1 ${pct(base.rank1)}`;
      return;
    }
    target.textContent = "all queries with this steering: computing…";
    if (metricsController) metricsController.abort();
    metricsController = new AbortController();
    try {
      const m = await api(`/api/metrics?${steeringParams(new URLSearchParams())}`,
                          { signal: metricsController.signal });
      const now = $("split-metrics");
      if (now) {
        now.textContent = `all queries with this steering: mAP ${pct(m.mAP)} (before ` +
          `${pct(base.mAP)}) · rank-1 ${pct(m.rank1)} (before ${pct(base.rank1)})`;
        now.dataset.metric = "split";
      }
    } catch (e) {
      if (e.name !== "AbortError") showError(e.message);
    }
  }

  function drawScores(r) {
    const table = $("scores");
    table.replaceChildren();
    const n = r.gallery.index.length;
    const head = el("tr", {}, el("th", { text: "" }), el("td", { class: "q", text: "query" }));
    for (let i = 0; i < n; i++) head.append(el("td", { class: "q", text: `#${i + 1}` }));
    table.append(head);
    r.selected_attributes.forEach((a, j) => {
      const ignored = state.ignore.has(a.attribute);
      const info = state.info.attributes[a.index];
      const weak = info.status === "not learned";  // starred as in the steering table
      const row = el("tr", { "data-attribute": a.attribute },
        el("th", { class: [ignored ? "ignored" : "", weak ? "weak" : ""].join(" ").trim(),
                   text: weak ? `${a.display} *` : a.display,
                   title: ignored ? "ignored in the ranking"
                     : info.caution ? `${info.meaning}. ${info.caution}` : info.meaning }),
        el("td", { class: "q", text: pct(a.probability, 0), title: `x_q = ${a.probability.toFixed(4)}` }));
      for (let i = 0; i < n; i++) {
        const s = r.matching_scores[i][j];
        const cell = el("td", { text: scorePercent(s),
                                title: `s = ${s.toFixed(4)}, x_g = ${r.gallery_probabilities[i][j].toFixed(4)}` });
        cell.style.background = scoreColor(s);
        row.append(cell);
      }
      table.append(row);
    });
    if (!r.selected_attributes.length) {
      table.append(el("tr", {}, el("td", { colSpan: n + 2, class: "muted",
        text: "No confident query attribute at this threshold." })));
    }
  }

  // ------------------------------------------------------------------ error composition

  function slices(values, names) {
    const order = values.map((v, i) => i).filter((i) => values[i] > 0)
      .sort((a, b) => values[b] - values[a] || a - b);
    const total = order.reduce((s, i) => s + values[i], 0);
    const keep = order.slice(0, PIE_SLICES).filter((i) => values[i] >= MIN_SLICE_SHARE * total);
    const rest = order.filter((i) => !keep.includes(i));
    const out = keep.map((i) => ({ name: names[i], value: values[i], color: color(names[i]) }));
    if (rest.length) {
      out.push({ name: `other (${rest.length})`, value: rest.reduce((s, i) => s + values[i], 0),
                 color: "#d1d3d9" });
    }
    return { slices: out, total };
  }

  function drawPie(parts, total) {
    const pie = $("pie");
    pie.replaceChildren();
    if (!parts.length || total <= 0) {
      pie.append(svg("text", { x: 0, y: 4, "text-anchor": "middle", "font-size": 12,
                               fill: "#5b6474" }));
      pie.lastChild.textContent = "no positive contribution";
      return;
    }
    let angle = -Math.PI / 2;
    for (const part of parts) {
      const share = part.value / total;
      const title = svg("title", {});
      title.textContent = `${part.name}: ${fmt(part.value)} (${(100 * share).toFixed(1)} %)`;
      let shape;
      if (share >= 0.9999) {
        shape = svg("circle", { cx: 0, cy: 0, r: 100, fill: part.color });
      } else {
        const end = angle + 2 * Math.PI * share;
        const large = share > 0.5 ? 1 : 0;
        const p = (a) => `${(100 * Math.cos(a)).toFixed(3)} ${(100 * Math.sin(a)).toFixed(3)}`;
        shape = svg("path", { d: `M 0 0 L ${p(angle)} A 100 100 0 ${large} 1 ${p(end)} Z`,
                              fill: part.color, stroke: "#fff", "stroke-width": 1 });
        angle = end;
      }
      shape.setAttribute("data-attribute", part.name);
      shape.append(title);
      pie.append(shape);
    }
  }

  function drawChosen() {
    const r = state.result;
    const detail = $("detail");
    for (const tile of $("ranking").querySelectorAll(".tile[data-rank]")) {
      tile.classList.toggle("chosen", Number(tile.dataset.rank) === state.chosen);
    }
    if (!r || state.chosen == null || state.chosen > r.gallery.index.length) {
      detail.hidden = true;
      return;
    }
    detail.hidden = false;
    const i = state.chosen - 1;
    const gal = r.gallery;
    const names = state.info.attributes.map((a) => a.name);
    const errors = r.errors[i];
    const mode = state.info.modes.find((m) => m.name === r.error_mode) || { pie: "positive" };
    const match = gal.true_match == null ? "identity unknown"
      : (gal.true_match[i] ? "true match" : "false match");
    $("detail-title").textContent = `rank ${state.chosen}: ${gal.file[i]} · ${match} · ` +
      `d² = ${gal.distance[i].toFixed(4)}`;

    const images = $("detail-images");
    images.replaceChildren(
      el("figure", {}, el("span", { class: "thumb query" }, el("img", { src: queryImage(state.query), alt: "query" })),
        el("figcaption", { text: "query" })),
      el("figure", {}, el("span", { class: `thumb ${gal.true_match == null ? "unknown" : (gal.true_match[i] ? "hit" : "miss")}` },
        el("img", { src: `/api/image/gallery/${gal.index[i]}`, alt: gal.file[i] })),
        el("figcaption", { text: `id ${gal.pid[i]} · camera ${gal.camera[i]}` })));

    const values = mode.pie === "all" ? errors.slice() : errors.map((e) => Math.max(e, 0));
    const { slices: parts, total: attributeTotal } = slices(values, names);
    // Projection: the remainder |r|² (the part no attribute direction explains) is its own slice.
    const remainder = mode.pie === "remainder" && r.remainder ? Math.max(r.remainder[i], 0) : 0;
    if (remainder > 0) parts.push({ name: "remainder |r|²", value: remainder, color: "#8a8f99" });
    const total = attributeTotal + remainder;
    drawPie(parts, total);
    const sum = errors.reduce((s, e) => s + e, 0);
    $("pie-caption").textContent = {
      all: `${r.error_mode}: Σe = ${fmt(sum)} = d²`,
      remainder: `${r.error_mode}: Σe + |r|² = ${fmt(sum + remainder)} = d² (negative parts listed)`,
      bars: `${r.error_mode}: P(labels differ) per attribute, not a decomposition of d²`,
    }[mode.pie] || `${r.error_mode}: pie = positive part (Σe⁺ = ${fmt(total)}, Σe = ${fmt(sum)})`;
    const legend = $("pie-legend");
    legend.replaceChildren();
    for (const part of parts) {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = part.color;
      legend.append(el("li", { "data-attribute": part.name }, swatch,
        el("span", { text: `${part.name} ${fmt(part.value)} (${(100 * part.value / total).toFixed(0)} %)` })));
    }
    const negatives = $("negatives");
    if (mode.pie === "all" || mode.pie === "bars") {
      negatives.textContent = "";
    } else {
      const neg = errors.map((e, a) => [e, a]).filter(([e]) => e < 0).sort((x, y) => x[0] - y[0]);
      const lines = ["negative (pull together):"];
      for (const [e, a] of neg.slice(0, LISTED_NEGATIVES)) lines.push(`  ${names[a].padEnd(10)} ${e >= 0 ? "+" : ""}${fmt(e)}`);
      if (neg.length > LISTED_NEGATIVES) {
        lines.push(`  … ${neg.length - LISTED_NEGATIVES} more`);
      }
      lines.push(neg.length ? `  total ${fmt(neg.reduce((s, [e]) => s + e, 0))}` : "  none");
      negatives.textContent = lines.join("\n");
    }
    drawMaps(i, parts);
  }

  function drawMaps(i, parts) {
    const box = $("maps");
    box.replaceChildren();
    if (!state.info.maps) {
      box.append(el("span", { class: "muted", text: "Attribute maps are not available on this server." }));
      return;
    }
    const r = state.result;
    const mapModes = state.info.map_modes || [];
    if (!mapModes.includes(r.error_mode)) {
      box.append(el("span", { class: "muted",
        text: `Attribute maps decompose the ${mapModes.join(" and ")} errors; choose one of those modes.` }));
      return;
    }
    const names = state.info.attributes.map((a) => a.name);
    const byName = Object.fromEntries(state.info.attributes.map((a) => [a.name, a]));
    const select = el("select", { "aria-label": "attribute of the maps" });
    for (const a of state.info.attributes) {
      // Attributes the head has not learned: their maps cannot show where they are.
      const tag = a.status === "not learned" ? ` (not learned, ${Math.round(100 * a.accuracy)} %)` : "";
      select.append(el("option", { value: a.name, text: a.name + tag }));
    }
    // The first map shown is the largest slice's of an attribute the head has learned.
    const first = parts.find((p) => names.includes(p.name) && !byName[p.name].caution)
      || parts.find((p) => names.includes(p.name));
    select.value = first ? first.name : names[0];
    const pair = el("div", { class: "pair" });
    const caution = el("p", { class: "caution", role: "note" });
    const draw = () => {
      const c = byName[select.value].caution;
      caution.textContent = c || "";
      caution.hidden = !c;
      const p = new URLSearchParams({ gallery: String(r.gallery.index[i]), attribute: select.value,
                                      mode: r.error_mode });
      p.set(state.query.kind === "upload" ? "upload" : "query", String(state.query.key));
      pair.replaceChildren();
      for (const [side, src] of [["query", queryImage(state.query)],
        ["gallery", `/api/image/gallery/${r.gallery.index[i]}`]]) {
        const q = new URLSearchParams(p);
        q.set("side", side);
        pair.append(el("span", { class: "overlay" }, el("img", { src, alt: side }),
          el("img", { class: "map", src: `/api/maps?${q}`, alt: `${side} map` })));
      }
    };
    select.addEventListener("change", draw);
    box.append(el("label", {}, "attribute maps of ", select), caution, pair);
    draw();
  }

  // ------------------------------------------------------------------ steering

  function buildSteering() {
    const body = $("steer-table").querySelector("tbody");
    for (const attribute of state.info.attributes) {
      const name = attribute.name;
      const ignore = el("input", { type: "checkbox", "data-ignore": name, title: `ignore ${name}` });
      const require = el("select", { "data-require": name, title: `require ${name}` },
        el("option", { value: "", text: "any" }), el("option", { value: "present", text: "present" }),
        el("option", { value: "absent", text: "absent" }));
      const weak = attribute.status === "not learned";
      const row = el("tr", { "data-attribute": name, class: weak ? "weak" : "" },
        el("td", { text: weak ? `${name} *` : name,
                   title: attribute.caution ? `${attribute.meaning}. ${attribute.caution}` : attribute.meaning }),
        el("td", { class: "prob", "data-prob": name }),
        el("td", {}, ignore), el("td", {}, require));
      ignore.addEventListener("change", () => {
        if (ignore.checked) state.ignore.add(name); else state.ignore.delete(name);
        steeringChanged();
      });
      require.addEventListener("change", () => {
        state.require.delete(name);
        state.forbid.delete(name);
        if (require.value === "present") state.require.add(name);
        if (require.value === "absent") state.forbid.add(name);
        steeringChanged();
      });
      body.append(row);
    }
    const weak = state.info.attributes.filter((a) => a.status === "not learned");
    if (weak.length) {
      $("steer-note").textContent = `* not learned by the model (balanced accuracy below ${Math.round(100 * state.info.min_accuracy)} % on the labelled test images): `
        + weak.map((a) => `${a.name} ${Math.round(100 * a.accuracy)} %`).join(", ")
        + ". Requiring one filters at close to chance.";
      $("steer-note").hidden = false;
    }
    const colours = (prefix, base) => state.info.attributes.map((a) => a.name)
      .filter((n) => n.startsWith(prefix) && n !== base);
    $("ignore-up").addEventListener("click", () => setIgnored(colours("up", "up"), true));
    $("ignore-down").addEventListener("click", () => setIgnored(colours("down", "down"), true));
    $("steer-reset").addEventListener("click", () => {
      state.ignore.clear(); state.require.clear(); state.forbid.clear();
      syncSteering();
      steeringChanged();
    });
  }

  function setIgnored(names, on) {
    for (const n of names) { if (on) state.ignore.add(n); else state.ignore.delete(n); }
    syncSteering();
    steeringChanged();
  }

  function syncSteering() {
    for (const box of document.querySelectorAll("[data-ignore]")) {
      box.checked = state.ignore.has(box.dataset.ignore);
    }
    for (const select of document.querySelectorAll("[data-require]")) {
      const n = select.dataset.require;
      select.value = state.require.has(n) ? "present" : state.forbid.has(n) ? "absent" : "";
    }
  }

  function steeringChanged() {
    for (const row of $("steer-table").querySelectorAll("tbody tr")) {
      const n = row.dataset.attribute;
      row.classList.toggle("on", state.ignore.has(n) || state.require.has(n) || state.forbid.has(n));
    }
    refresh();
  }

  function drawProbabilities(r) {
    for (const cell of document.querySelectorAll("[data-prob]")) {
      const a = state.info.attributes.findIndex((x) => x.name === cell.dataset.prob);
      const x = r.query_probabilities[a];
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.round(30 * x)}px`;
      cell.replaceChildren(bar, ` ${(100 * x).toFixed(0)}`);
      cell.title = `query probability ${x.toFixed(3)}`;
    }
  }

  // ------------------------------------------------------------------ uploads

  async function uploadImage(input) {
    const file = input.files && input.files[0];
    const message = $("upload-message");
    message.classList.remove("error");
    if (!file) return;
    const limit = state.info.max_upload_bytes;
    if (file.size > limit) {
      message.classList.add("error");
      message.textContent = `${file.name} is ${(file.size / 1048576).toFixed(1)} MB; the ` +
        `server accepts at most ${(limit / 1048576).toFixed(1)} MB.`;
      input.value = "";
      return;
    }
    message.textContent = `embedding ${file.name} …`;
    const p = rankParams();
    p.set("name", file.name);
    try {
      const result = await api(`/api/rank?${p}`, {
        method: "POST", body: file,
        headers: { "Content-Type": file.type || "application/octet-stream" },
      });
      state.query = { kind: "upload", key: result.upload };
      state.chosen = null;
      state.result = result;
      for (const li of $("query-list").children) li.classList.remove("active");
      render(result);
      message.textContent = `ranked your image ${result.query.file}`;
    } catch (e) {
      message.classList.add("error");
      message.textContent = e.message;
    } finally {
      input.value = "";
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.body.dataset.busy = "0";
    init().catch((e) => showError(`could not start: ${e.message}`));
  });
})();
