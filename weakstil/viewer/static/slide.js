// Slide page: the slide in OpenSeadragon (Deep Zoom tiles from the server), a heatmap layer on top
// (prediction on the fixed 0-100 sTIL% scale, attention, contribution), opacity, legend, tile values,
// a scale bar in µm and the overview (navigator) in the side panel, where it covers no tissue.
"use strict";

(function () {
  const slideId = decodeURIComponent(window.location.pathname.replace(/^\/slides\//, ""));
  const api = "/api/slides/" + encodeURIComponent(slideId);
  const state = { info: null, viewer: null, slideItem: null, overlay: null, layer: null, on: true,
                  opacity: 0.7, tiles: null, buckets: null, bucket: 1, pinned: null, marker: null };

  const $ = (id) => document.getElementById(id);

  function fmt(value, digits) {
    return value === null || value === undefined || !Number.isFinite(value) ? "–" : Number(value).toFixed(digits);
  }

  function facts(info) {
    const s = info.slide;
    const parts = [`sTIL % ${fmt(s.score, 1)}`];
    if (s.label !== null && s.label !== undefined) {
      parts.push(`label ${fmt(s.label, 1)}`);
      if (s.error_vs_label !== null && s.error_vs_label !== undefined) {
        parts.push(`model − label ${s.error_vs_label >= 0 ? "+" : ""}${fmt(s.error_vs_label, 1)}`);
      }
    }
    parts.push(`status ${s.status || "–"}`);
    if (info.n_tiles !== undefined) parts.push(`${info.n_tiles} tiles`);
    if (info.image) {
      parts.push(`${info.image.width} × ${info.image.height} px` +
                 (info.image.mpp ? ` at ${fmt(info.image.mpp, 3)} µm/px` : " (resolution not stated)"));
    }
    if (s.error) parts.push(`error: ${s.error}`);
    return parts.join(" · ");
  }

  // --- legend -------------------------------------------------------------------------------------
  function showLegend(layer) {
    // Fixed scales (weakstil.heatmap.LAYERS), the same on every slide: labelled ticks at their place
    // on the bar, thinned so that neighbours keep at least MIN_GAP % apart (the ends always shown).
    const MIN_GAP = 16;
    // The ramp sits on a tissue-coloured strip at the overlay's opacity: the legend shows the colours
    // as they look on the slide, not the pure colours, which no tile shows once blended.
    $("legend-ramp").style.background = `linear-gradient(to right, ${layer.colors.join(", ")})`;
    const shown = [];
    layer.ticks.forEach((tick, k) => {
      const last = k === layer.ticks.length - 1;
      while (last && shown.length > 1 && tick.at - shown[shown.length - 1].at < MIN_GAP) shown.pop();
      if (!shown.length || last || tick.at - shown[shown.length - 1].at >= MIN_GAP) shown.push(tick);
    });
    const ticks = $("legend-ticks");
    ticks.replaceChildren(...shown.map((tick) => {
      const span = document.createElement("span");
      span.textContent = tick.label;
      span.style.left = `${tick.at}%`;
      return span;
    }));
    let text = layer.label + (layer.log ? ", log scale" : "");
    const score = state.info.slide.score;
    const marker = $("legend-score");
    if (layer.layer === "prediction" && score !== null && score !== undefined) {
      marker.hidden = false;
      marker.style.left = `${Math.min(100, Math.max(0, score))}%`;
      text += `; red line: slide score ${fmt(score, 1)}`;
    } else {
      marker.hidden = true;
    }
    $("legend-label").textContent = text;
  }

  // --- overlay --------------------------------------------------------------------------------------
  function setLayer(name) {
    const layer = state.info.layers.find((l) => l.layer === name);
    if (!layer || !state.viewer) return;
    state.layer = layer;
    showLegend(layer);
    if (state.overlay) state.viewer.world.removeItem(state.overlay);
    state.overlay = null;
    state.viewer.addTiledImage({
      tileSource: layer.dzi, x: 0, y: 0, width: 1, opacity: state.on ? state.opacity : 0,
      success: (event) => {
        if (state.layer !== layer) { state.viewer.world.removeItem(event.item); return; }
        state.overlay = event.item;
        document.body.dataset.overlay = layer.layer;
      },
    });
  }

  function setOverlayVisible(on) {
    state.on = on;
    $("overlay-on").checked = on;
    if (state.overlay) state.overlay.setOpacity(on ? state.opacity : 0);
    document.body.dataset.overlayOn = on ? "1" : "0";
  }

  function setOpacity(percent) {
    state.opacity = percent / 100;
    $("opacity-value").textContent = `${percent}%`;
    $("legend-ramp").style.opacity = String(state.opacity);
    $("legend-blend").textContent = `colours as drawn over tissue at ${percent}% opacity`;
    if (state.overlay && state.on) state.overlay.setOpacity(state.opacity);
  }

  // --- scale bar --------------------------------------------------------------------------------------
  const NICE_UM = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000];

  function updateScaleBar() {
    const mpp = state.info && state.info.image && state.info.image.mpp;
    const box = $("scalebar");
    if (!state.slideItem) return;
    box.hidden = false;
    if (!mpp) { $("scalebar-label").textContent = "scale unknown (no mpp)"; $("scalebar-bar").style.width = "0"; return; }
    // screen pixels per level-0 image pixel at the current zoom
    const screenPerImage = state.slideItem.viewportToImageZoom(state.viewer.viewport.getZoom(true));
    const umPerScreenPx = mpp / screenPerImage;
    const um = NICE_UM.find((v) => v / umPerScreenPx >= 80) || NICE_UM[NICE_UM.length - 1];
    $("scalebar-bar").style.width = `${Math.round(um / umPerScreenPx)}px`;
    $("scalebar-label").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
    box.dataset.um = String(um);
  }

  // --- tile values -----------------------------------------------------------------------------------
  function indexTiles(t) {
    const n = t.x.length;
    let size = 1;
    for (let i = 0; i < n; i++) size = Math.max(size, t.width[i], t.height[i]);
    const buckets = new Map();
    for (let i = 0; i < n; i++) {
      const key = Math.floor(t.x[i] / size) + "," + Math.floor(t.y[i] / size);
      if (!buckets.has(key)) buckets.set(key, []);
      buckets.get(key).push(i);
    }
    state.tiles = t; state.buckets = buckets; state.bucket = size;
  }

  function tileAt(x, y) {
    if (!state.tiles) return -1;
    const t = state.tiles, s = state.bucket, bx = Math.floor(x / s), by = Math.floor(y / s);
    let found = -1;
    for (const [dx, dy] of [[0, 0], [-1, 0], [0, -1], [-1, -1]]) {
      for (const i of state.buckets.get((bx + dx) + "," + (by + dy)) || []) {
        if (x >= t.x[i] && x < t.x[i] + t.width[i] && y >= t.y[i] && y < t.y[i] + t.height[i]) found = i; // later wins, as painted
      }
    }
    return found;
  }

  function showTile(x, y, i) {
    $("ti-xy").textContent = `${Math.round(x)}, ${Math.round(y)}`;
    const t = state.tiles;
    $("ti-prediction").textContent = i < 0 ? "no tile here" : fmt(t.prediction[i], 1);
    $("ti-attention").textContent = i < 0 || t.attention[i] === null ? "–" : weightText(t.attention[i] * t.x.length);
    $("ti-contribution").textContent = i < 0 || t.contribution[i] === null ? "–" : contributionText(t.contribution[i]);
  }

  function weightText(relative) {
    // attention × N: 1 = the weight every tile would get if all counted the same
    if (!(relative > 0)) return "no weight (does not count)";
    if (relative >= 0.995 && relative < 1.005) return "as much as an average tile";
    return relative >= 1 ? `${relative.toFixed(relative >= 10 ? 0 : 1)}× an average tile's weight`
                         : `${(1 / relative).toFixed(relative <= 0.1 ? 0 : 1)}× less than an average tile`;
  }

  function contributionText(points) {
    // contribution = attention × tile sTIL%: the tile's share of the slide score, in sTIL% points
    const score = state.info.slide.score;
    const digits = points >= 1 ? 1 : points >= 0.1 ? 2 : 3;
    let text = `adds ${points.toFixed(digits)} sTIL% points to the slide score`;
    if (score) text += ` (${fmt(score, 1)}; ${(100 * points / score).toFixed(points / score >= 0.01 ? 0 : 1)}% of it)`;
    return text;
  }

  function imagePoint(position) {
    const vp = state.viewer.viewport.pointFromPixel(position);
    return state.slideItem.viewportToImageCoordinates(vp);
  }

  function pin(i) {
    if (state.marker) { state.viewer.removeOverlay(state.marker); state.marker = null; }
    state.pinned = i;
    $("pinned").hidden = i === null;
    if (i === null || i < 0) return;
    const t = state.tiles;
    const rect = state.slideItem.imageToViewportRectangle(t.x[i], t.y[i], t.width[i], t.height[i]);
    state.marker = document.createElement("div");
    state.marker.className = "pin-box";
    state.viewer.addOverlay({ element: state.marker, location: rect });
  }

  // --- start ---------------------------------------------------------------------------------------
  function buildViewer(info) {
    const viewer = OpenSeadragon({
      id: "osd",
      prefixUrl: "/vendor/openseadragon/images/",
      tileSources: info.image.dzi,
      drawer: "canvas",
      showNavigator: true,
      navigatorId: "navigator",
      maxZoomPixelRatio: 4,
      visibilityRatio: 0.5,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    });
    state.viewer = viewer;
    viewer.addOnceHandler("open", () => {
      state.slideItem = viewer.world.getItemAt(0);
      document.body.dataset.open = "1";
      updateScaleBar();
      if (state.info.layers.length) setLayer(state.layer ? state.layer.layer : state.info.layers[0].layer);
    });
    viewer.addHandler("animation", updateScaleBar);
    viewer.addHandler("resize", updateScaleBar);
    viewer.addHandler("open-failed", (event) => {
      $("facts").textContent += " · could not open the slide: " + (event.message || "error");
    });
    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      moveHandler: (event) => {
        if (!state.slideItem || state.pinned !== null) return;
        const p = imagePoint(event.position);
        showTile(p.x, p.y, tileAt(p.x, p.y));
      },
    });
    viewer.addHandler("canvas-click", (event) => {
      if (!event.quick || !state.slideItem || !state.tiles) return;
      const p = imagePoint(event.position);
      const i = tileAt(p.x, p.y);
      if (state.pinned !== null && state.pinned === i) { pin(null); return; }
      showTile(p.x, p.y, i);
      pin(i);
    });
  }

  function buildControls(info) {
    if (!info.layers.length) {
      $("no-layers").hidden = false;
      $("layer-controls").hidden = true;
      return;
    }
    const box = $("layers");
    for (const layer of info.layers) {
      const input = document.createElement("input");
      Object.assign(input, { type: "radio", name: "layer", value: layer.layer, id: "layer-" + layer.layer });
      input.addEventListener("change", () => setLayer(layer.layer));
      const label = document.createElement("label");
      label.append(input, " " + (layer.layer === "prediction" ? "tile sTIL % (prediction)" : layer.layer));
      box.append(label);
    }
    box.querySelector("input").checked = true;
    state.layer = info.layers[0];
    showLegend(info.layers[0]);
    $("overlay-on").addEventListener("change", (e) => setOverlayVisible(e.target.checked));
    $("opacity").addEventListener("input", (e) => setOpacity(Number(e.target.value)));
    setOpacity(Number($("opacity").value));
  }

  function buildFiles(info) {
    const list = $("files");
    for (const [name, url] of Object.entries(info.files)) {
      const a = document.createElement("a");
      a.href = url; a.textContent = name;
      const li = document.createElement("li");
      li.append(a);
      list.append(li);
    }
    if (!list.children.length) list.append(Object.assign(document.createElement("li"), { textContent: "none" }));
  }

  // a damaged results file answers 4xx with JSON {error, file, problem, fix}: show its message
  async function apiErrorText(response) {
    const fallback = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      return body && body.error ? body.error : fallback;
    } catch (err) {
      return fallback;
    }
  }

  async function load() {
    const response = await fetch(api);
    if (!response.ok) throw new Error(await apiErrorText(response));
    const info = await response.json();
    state.info = info;
    document.title = `weakstil — ${slideId}`;
    $("title").textContent = slideId;
    $("facts").textContent = facts(info);
    buildControls(info);
    buildFiles(info);
    if (info.tiles_url) {
      fetch(info.tiles_url).then((r) => r.json()).then(indexTiles);
    }
    if (info.image) {
      buildViewer(info);
    } else {
      $("osd").hidden = true;
      $("no-slide").hidden = false;
      if (info.slide_error) $("no-slide-why").textContent = "The slide file cannot be read: " + info.slide_error;
      if (info.files["heatmap.png"]) $("static-heatmap").src = info.files["heatmap.png"];
      else $("static-heatmap").hidden = true;
    }
    document.body.dataset.ready = "1";
  }

  // for people poking at it in the console, and for the browser test
  window.weakstilViewer = { state, setLayer, setOverlayVisible, setOpacity, tileAt, updateScaleBar };

  document.addEventListener("DOMContentLoaded", () => {
    load().catch((err) => {
      $("facts").textContent = "Could not load this slide: " + err.message;
      $("facts").classList.add("error");
    });
  });
})();
