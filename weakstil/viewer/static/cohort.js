// Cohort page: every slide of results/scores.csv, sortable by clicking a column title.
"use strict";

(function () {
  const state = { rows: [], key: null, dir: 1, hasLabel: false };

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) node.append(child);
    return node;
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function picture(url, alt, missing) {
    if (!url) return el("div", { className: "placeholder", textContent: missing });
    return el("img", { src: url, alt: alt, loading: "lazy", decoding: "async" });
  }

  function compare(a, b) {
    const va = a[state.key], vb = b[state.key];
    const missA = va === null || va === undefined || va === "", missB = vb === null || vb === undefined || vb === "";
    if (missA || missB) return missA === missB ? 0 : missA ? 1 : -1; // missing values last, either way
    if (typeof va === "number" && typeof vb === "number") return state.dir * (va - vb);
    return state.dir * String(va).localeCompare(String(vb), undefined, { numeric: true });
  }

  function render() {
    const rows = state.key ? [...state.rows].sort(compare) : state.rows;
    const body = document.querySelector("#cohort tbody");
    body.replaceChildren();
    for (const row of rows) {
      const link = el("a", { href: row.url, textContent: row.slide_id });
      const status = el("td", { className: "status-" + (row.status || "unknown") }, [row.status || "–"]);
      if (row.error) status.append(el("span", { className: "err-text", textContent: row.error }));
      const cells = [
        el("td", {}, [picture(row.thumbnail, "thumbnail of " + row.slide_id, "no slide file")]),
        el("td", {}, [picture(row.heatmap_thumbnail, "heatmap of " + row.slide_id,
                              row.has_tiles ? "no slide file" : "no tiles")]),
        el("td", {}, [link]),
        el("td", { className: "num score", textContent: fmt(row.score, 1) }),
      ];
      if (state.hasLabel) {
        const diff = row.error_vs_label;
        cells.push(el("td", { className: "num label", textContent: fmt(row.label, 1) }),
                   el("td", { className: "num diff", textContent: diff === null || diff === undefined ? "–"
                     : (diff >= 0 ? "+" : "−") + Math.abs(diff).toFixed(1) }));
      }
      cells.push(el("td", { className: "num", textContent: fmt(row.n_tiles, 0) }), status);
      const flags = (row.qc || "").split(";").filter((f) => f);
      cells.push(el("td", { className: "qc" }, flags.map((f) => el("span", { className: "qc-flag", textContent: f }))));
      const tr = el("tr", { className: flags.length ? "clickable qc-flagged" : "clickable" }, cells);
      tr.dataset.slideId = row.slide_id;
      tr.addEventListener("click", (event) => {
        if (event.target.closest("a")) return;
        window.location.href = row.url;
      });
      body.append(tr);
    }
    for (const button of document.querySelectorAll("#cohort th button")) {
      if (button.dataset.sort === state.key) button.dataset.dir = state.dir > 0 ? "asc" : "desc";
      else delete button.dataset.dir;
    }
  }

  function summary(data) {
    const n = data.slides.length;
    const ok = data.slides.filter((r) => r.status === "ok").length;
    const failed = data.slides.filter((r) => r.status === "failed").length;
    let text = `${n} slide${n === 1 ? "" : "s"}: ${ok} scored`;
    if (failed) text += `, ${failed} failed`;
    text += ` — results: ${data.results_dir}`;
    text += data.slides_dir ? `; slides: ${data.slides_dir}` : "; no slides folder (thumbnails and deep zoom need --slides)";
    return text;
  }

  function evaluationText(data) {
    const e = data.evaluation;
    if (!e) return null;
    const f = (v, d) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
    const source = data.labels_file ? `labels: ${data.labels_file}` : "labels: scores.csv";
    return `Model vs labels over ${e.n} scored slides — R² ${f(e.r2, 2)} · Pearson r ${f(e.pearson, 2)} · ` +
           `mean absolute error ${f(e.mae, 1)} sTIL% points · AUC (sTIL ≥ 30 %) ${f(e["auc@30"], 2)} (${source})` +
           (e.n < 10 ? ` — only ${e.n} slides: indicative, not an evaluation` : "");
  }

  async function load() {
    try {
      const response = await fetch("/api/cohort", { headers: { accept: "application/json" } });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const data = await response.json();
      state.rows = data.slides;
      state.hasLabel = data.has_label;
      for (const node of document.querySelectorAll(".label-col")) node.hidden = !data.has_label;
      document.getElementById("summary").textContent = summary(data);
      const evaluation = evaluationText(data);
      if (evaluation) {
        const box = document.getElementById("evaluation");
        box.textContent = evaluation;
        box.hidden = false;
      }
      render();
      document.body.dataset.ready = "1";
    } catch (err) {
      const box = document.getElementById("error");
      box.hidden = false;
      box.textContent = "Could not load the cohort: " + err.message;
    }
  }

  async function loadCard() {  // the model card of the model that scored these results, if any
    try {
      const response = await fetch("/api/model-card", { headers: { accept: "application/json" } });
      if (!response.ok) return;
      const data = await response.json();
      if (!data.markdown) return;
      const card = data.card || {};
      const cv = (card.cv_metrics || {}).pooled || {};
      const r2 = typeof cv.r2 === "number" ? `CV R² ${cv.r2.toFixed(2)}` : "";
      const slides = card.n_slides ? `${card.n_slides} training slides` : "";
      document.getElementById("model-card-summary").textContent =
        [card.name || data.model, slides, r2].filter((x) => x).join(" · ");
      document.getElementById("model-card-text").textContent = data.markdown;
      document.getElementById("model-card").hidden = false;
    } catch (err) {
      console.warn("no model card:", err);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const button of document.querySelectorAll("#cohort th button")) {
      button.addEventListener("click", () => {
        const key = button.dataset.sort;
        state.dir = state.key === key ? -state.dir : (key === "score" || key === "label" || key === "error_vs_label" ? -1 : 1);
        state.key = key;
        render();
      });
    }
    load();
    loadCard();
  });
})();
