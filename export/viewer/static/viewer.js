// stimage view: plain JS over OpenSeadragon and the JSON API (/api/...). No build step.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { genes: [], generation: -1, ready: false, gene: null, layer: "mean", overlay: null,
                  spot: null, lastServerMessage: null, flash: false, diameter: 0, shape: "circle" };

  const viewer = OpenSeadragon({
    element: $("viewer"), prefixUrl: "/static/openseadragon/images/", tileSources: "/slide.dzi",
    showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", maxZoomPixelRatio: 2, visibilityRatio: 0.5,
    autoHideControls: false,
    gestureSettingsMouse: { clickToZoom: false }, crossOriginPolicy: false,
  });
  const base = () => viewer.world.getItemAt(0);

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = String(text).replace(/\s+/g, " ");
    el.classList.toggle("error", !!isError);
  }

  async function getJSON(url, options) {
    const r = await fetch(url, options);
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: `${r.status} ${r.statusText}` }; }
    if (!r.ok) { const err = new Error(body && body.error ? body.error : `${r.status}`); err.status = r.status; throw err; }
    return body;
  }

  const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v)) ? "–"
    : (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : Number(v.toPrecision(digits)).toString());

  // ------------------------------------------------------------------ status and genes
  async function poll() {
    try {
      const st = await getJSON("/api/status");
      $("section").textContent = st.section ? `· ${st.section}` : "";
      $("progress").value = st.progress || 0;
      $("progress").hidden = st.state === "ready";
      if (st.message !== state.lastServerMessage) {
        state.lastServerMessage = st.message;
        if (!state.flash || st.state === "ready") setStatus(st.message, st.state === "error");
        state.flash = false;
      }
      if (st.state === "ready" && (!state.ready || st.generation !== state.generation)) {
        state.generation = st.generation;
        await loadGenes();
      }
    } catch (e) { /* the server restarts or stops: keep polling quietly */ }
    setTimeout(poll, 500);
  }

  async function loadGenes() {
    const g = await getJSON("/api/genes");
    state.genes = g.genes;
    const sel = $("gene-select");
    const keep = state.gene && g.genes.includes(state.gene) ? state.gene : null;
    sel.innerHTML = "";
    for (const name of g.genes) sel.add(new Option(name, name));
    const ls = $("layer-select");
    const keepLayer = g.layers.includes(state.layer) ? state.layer : "mean";
    ls.innerHTML = "";
    for (const l of g.layers) ls.add(new Option(g.layer_labels[l], l));
    ls.value = keepLayer;
    state.layer = keepLayer;
    state.ready = g.ready;
    filterGenes();
    const want = keep || new URLSearchParams(location.search).get("gene");
    if (want && g.genes.includes(want)) { sel.value = want; await chooseGene(want); }
    else { sel.selectedIndex = -1; state.gene = null; removeOverlay(); }
    document.body.dataset.ready = "1";
  }

  function filterGenes() {
    const q = $("gene-filter").value.trim().toLowerCase();
    for (const o of $("gene-select").options) o.hidden = q !== "" && !o.value.toLowerCase().includes(q);
  }

  // ------------------------------------------------------------------ overlays
  function removeOverlay() {
    if (state.overlay) { viewer.world.removeItem(state.overlay); state.overlay = null; }
    $("colorbar").hidden = true;
    delete $("viewer").dataset.overlay;
  }

  async function chooseGene(gene) {
    state.gene = gene;
    await drawOverlay();
    if (state.spot) await showSpot(state.spot);
  }

  async function drawOverlay() {
    const gene = state.gene, layer = state.layer;
    if (!gene) return;
    let spots;
    try {
      spots = await getJSON(`/api/spots?gene=${encodeURIComponent(gene)}&layer=${layer}`);
    } catch (e) { setStatus(`error: ${e.message}`, true); state.flash = true; return; }
    state.diameter = spots.diameter_px; state.shape = spots.shape;
    const url = `/api/overlay.png?gene=${encodeURIComponent(gene)}&layer=${layer}&g=${state.generation}`;
    const opacity = $("opacity").value / 100;
    const old = state.overlay;
    viewer.addTiledImage({
      tileSource: { type: "image", url, buildPyramid: false }, x: 0, y: 0, width: 1, opacity,
      success: (ev) => {
        if (old) viewer.world.removeItem(old);
        state.overlay = ev.item;
        const done = () => { $("viewer").dataset.overlay = `${gene}:${layer}`; };
        if (ev.item.getFullyLoaded()) done(); else ev.item.addOnceHandler("fully-loaded-change", done);
      },
      error: () => { setStatus(`error: the ${layer} overlay of ${gene} did not load`, true); state.flash = true; },
    });
    const label = $("layer-select").selectedOptions[0] ? $("layer-select").selectedOptions[0].text : layer;
    $("colorbar-title").textContent = `${gene}: ${label} (1st–99th percentile)`;
    $("vmin").textContent = fmt(spots.vmin, 3);
    $("vmax").textContent = fmt(spots.vmax, 3);
    $("colorbar").hidden = false;
  }

  // ------------------------------------------------------------------ spot panel
  function markSpot(x, y) {
    viewer.clearOverlays();
    const d = state.diameter || 1;
    const el = document.createElement("div");
    el.className = "spot-ring" + (state.shape === "square" ? " square" : "");
    viewer.addOverlay({ element: el, location: base().imageToViewportRectangle(x - d / 2, y - d / 2, d, d) });
  }

  function setCell(key, value, text) {
    const td = document.querySelector(`[data-testid="spot-${key}"]`);
    td.textContent = text !== undefined ? text : fmt(value);
    if (value !== null && value !== undefined) td.dataset.value = String(value); else delete td.dataset.value;
  }

  async function showSpot(id) {
    const gene = state.gene || state.genes[0];
    const s = await getJSON(`/api/spot?id=${encodeURIComponent(id)}&gene=${encodeURIComponent(gene)}`);
    fillPanel(s);
  }

  function fillPanel(s) {
    state.spot = s.spot;
    $("spot-hint").hidden = true;
    $("spot-table").hidden = false;
    setCell("id", null, s.spot);
    setCell("gene", null, s.gene);
    setCell("mean", s.mean);
    $("interval-label").textContent = `${Math.round(s.interval * 100)} % interval`;
    const cell = document.querySelector('[data-testid="spot-interval"]');
    cell.textContent = `${fmt(s.q_lo)} – ${fmt(s.q_hi)}`;
    cell.dataset.lo = String(s.q_lo); cell.dataset.hi = String(s.q_hi);
    setCell("var_aleatoric", s.var_aleatoric);
    setCell("var_epistemic", s.var_epistemic);
    setCell("tissue_coverage", s.tissue_coverage, s.tissue_coverage === null ? "–" : `${(s.tissue_coverage * 100).toFixed(0)} %`);
    setCell("observed", s.observed);
    $("explain-button").disabled = false;
    $("spot-panel").dataset.spot = s.spot;
    markSpot(s.x, s.y);
  }

  async function selectAt(x, y) {
    if (!state.ready) return;
    const gene = state.gene || state.genes[0];
    try {
      const s = await getJSON(`/api/spot?x=${x}&y=${y}&gene=${encodeURIComponent(gene)}`);
      if (s.spot === null) return;
      fillPanel(s);
    } catch (e) { setStatus(`error: ${e.message}`, true); state.flash = true; }
  }

  viewer.addHandler("canvas-click", (ev) => {
    if (!ev.quick || !base()) return;
    const p = base().viewerElementToImageCoordinates(ev.position);
    selectAt(p.x, p.y);
  });

  // ------------------------------------------------------------------ explanations
  async function explain() {
    const spot = state.spot, gene = state.gene || state.genes[0];
    if (!spot) return;
    $("explain-button").disabled = true;
    $("explain-progress").hidden = false;
    $("explain-progress").value = 0;
    $("explain-result").hidden = true;
    try {
      let job = await getJSON("/api/explain", {
        method: "POST", headers: { "Content-Type": "application/json", "X-Stimage": "1" },
        body: JSON.stringify({ spot, gene }),
      });
      while (job.state === "queued" || job.state === "running") {
        setStatus(`explaining ${gene} at ${spot}: ${Math.round(job.progress * 100)} %`);
        state.flash = true;
        $("explain-progress").value = job.progress;
        await new Promise((r) => setTimeout(r, 300));
        job = await getJSON(`/api/explain/${job.job}`);
      }
      if (job.state === "error") throw new Error(job.error);
      showExplanation(job);
      setStatus(`LIME over ${job.n_nuclei} nuclei for ${gene} at ${spot} (R² ${job.score.toFixed(2)})`);
      state.flash = true;
    } catch (e) {
      setStatus(`error: ${e.message}`, true); state.flash = true;
    } finally {
      $("explain-button").disabled = false;
      $("explain-progress").hidden = true;
    }
  }

  function showExplanation(job) {
    $("explain-image").src = job.image;
    $("nuclei-csv").href = job.csv;
    $("explain-summary").textContent = `${job.n_nuclei} nuclei, predicted ${fmt(job.value)}`;
    const body = $("nuclei-table").tBodies[0];
    body.innerHTML = "";
    const rows = [...job.rows].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    for (const r of rows) {
      const tr = body.insertRow();
      tr.dataset.nucleus = r.nucleus;
      tr.insertCell().textContent = r.nucleus;
      tr.insertCell().textContent = r.area_um2.toFixed(1);
      const w = tr.insertCell();
      w.textContent = fmt(r.weight, 3);
      w.dataset.value = String(r.weight);
    }
    $("explain-result").hidden = false;
    $("spot-panel").dataset.explained = `${job.spot}:${job.gene}`;
  }

  // ------------------------------------------------------------------ model upload
  async function upload(file) {
    setStatus(`uploading ${file.name}…`); state.flash = true;
    try {
      const r = await getJSON("/api/model", {
        method: "POST", body: file, headers: { "X-Stimage": "1", "X-Filename": file.name,
                                               "Content-Type": "application/octet-stream" },
      });
      setStatus(`loaded ${r.model} (${r.genes.length} genes); predicting…`); state.flash = true;
    } catch (e) {
      setStatus(`error: ${e.message}`, true); state.flash = true;
    } finally {
      $("model-upload").value = "";
    }
  }

  // ------------------------------------------------------------------ wiring
  $("gene-filter").addEventListener("input", filterGenes);
  $("gene-select").addEventListener("change", (e) => chooseGene(e.target.value));
  $("layer-select").addEventListener("change", (e) => { state.layer = e.target.value; drawOverlay(); });
  $("opacity").addEventListener("input", (e) => {
    $("opacity-value").textContent = `${e.target.value} %`;
    if (state.overlay) state.overlay.setOpacity(e.target.value / 100);
  });
  $("explain-button").addEventListener("click", explain);
  $("model-upload").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });

  // for automation (tests, notebooks driving a browser): slide px → page px
  window.stimage = {
    viewer,
    imageToPage(x, y) {
      const p = base().imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
      const r = $("viewer").getBoundingClientRect();
      return { x: r.left + p.x, y: r.top + p.y };
    },
    selectSpot: showSpot,
  };
  viewer.addHandler("open", () => { $("viewer").dataset.opened = "1"; });
  poll();
})();
