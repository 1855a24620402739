// View of one job: state and live progress, the bundle's arrays and sizes, the attention heatmap
// with layer / head / sequence pickers, the text with token alternatives and the head label grid.

import { ApiError, getJson, jobPath, query } from "./api.js";
import { formatBytes, formatTime, h, modelName, progressCell, stateBadge, updateProgress } from "./format.js";
import { Heatmap } from "./heatmap.js";
import { renderLabels } from "./labels.js";
import { LiveJobs } from "./live.js";
import { renderText } from "./tokens.js";

const ITEM_BYTES = { bool: 1, int8: 1, uint8: 1, int16: 2, uint16: 2, float16: 2, int32: 4, uint32: 4, float32: 4, int64: 8, uint64: 8, float64: 8 };

/** How the slices route addresses an array: "<group>/<name>" for group arrays ("summary/label"). */
function arrayName(entry) {
  return entry.group && !entry.name.startsWith(`${entry.group}/`) ? `${entry.group}/${entry.name}` : entry.name;
}

function arrayBytes(entry) {
  const item = ITEM_BYTES[entry.dtype];
  return item ? entry.shape.reduce((a, b) => a * b, 1) * item : NaN;
}

function select(name, options, value) {
  const element = h(
    "select",
    { name, className: `picker picker-${name}` },
    ...options.map(([v, label]) => h("option", { value: String(v) }, label)),
  );
  element.value = String(value);
  return element;
}

export function jobView(main, jobId) {
  const title = h("h2", {}, "Job ", h("code", {}, jobId));
  const state = h("span", { className: "job-state" });
  const progress = progressCell({ state: "queued", progress: {} });
  const facts = h("dl", { className: "facts" });
  const error = h("pre", { className: "error", hidden: true });
  const arraysBox = h("div", { className: "arrays" }, h("p", { className: "status" }, "loading…"));
  const attentionBox = h("div", { className: "attention" });
  const textBox = h("div", { className: "text" });
  const labelsBox = h("div", { className: "labels" });
  const sections = {
    attention: h("section", { hidden: true }, h("h3", {}, "Attention"), attentionBox),
    text: h("section", { hidden: true }, h("h3", {}, "Text"), textBox),
    labels: h("section", { hidden: true }, h("h3", {}, "Head labels"), labelsBox),
  };
  main.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← my jobs")),
    h("section", { className: "job-head" }, title, h("div", { className: "job-line" }, state, progress), facts, error),
    sections.attention,
    sections.text,
    sections.labels,
    h("section", {}, h("h3", {}, "Arrays"), arraysBox),
  );

  let bundle = null; // what loadBundle found
  let loading = false;
  let heatmap = null;
  let lastState = null;

  const showJob = (job) => {
    state.replaceChildren(stateBadge(job.state));
    main.dataset.jobState = job.state;
    updateProgress(progress, job);
    facts.replaceChildren(
      ...[
        ["model", modelName(job)],
        ["label", job.label ?? "–"],
        ["created", formatTime(job.created_at)],
        ["finished", formatTime(job.finished_at)],
        ["written", formatBytes(job.progress?.bytes_written ?? 0)],
      ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    );
    error.hidden = !job.error;
    error.textContent = job.error ? `${job.error.title ?? ""}: ${job.error.detail ?? ""}` : "";
    if (job.state !== lastState) {
      lastState = job.state;
      if (!bundle && !loading) loadBundle();
    }
  };

  const live = new LiveJobs({ onJob: showJob, poll: async () => [await getJson(jobPath(jobId))] });
  getJson(jobPath(jobId))
    .then((job) => {
      showJob(job);
      live.update([job]);
    })
    .catch((e) => {
      title.after(h("p", { className: "error" }, `cannot load job: ${e.message}`));
    });

  async function loadBundle() {
    loading = true;
    try {
      const listing = await getJson(jobPath(jobId, "/arrays"));
      bundle = await describe(listing);
      renderArrays(listing);
      await renderBundle();
    } catch (e) {
      bundle = null;
      const note = e instanceof ApiError && e.status === 409 ? "no readable bundle yet" : "cannot read the bundle";
      arraysBox.replaceChildren(h("p", { className: "status" }, `${note}: ${e.message}`));
    } finally {
      loading = false;
    }
  }

  async function coordinate(listing, names, name, fallbackCount) {
    if (names.has(name)) {
      try {
        // a bulk job's arrays are read per sequence (its micro-batches share the coordinates)
        const params = { format: "json", seq: listing.bulk ? 0 : undefined };
        return (await getJson(jobPath(jobId, `/arrays/${name}${query(params)}`))).data;
      } catch (e) {
        console.warn(`coordinate ${name}: ${e.message}`);
      }
    }
    return Array.from({ length: fallbackCount }, (_, i) => i);
  }

  async function describe(listing) {
    const arrays = new Map(listing.arrays.map((entry) => [arrayName(entry), entry]));
    const names = new Set(arrays.keys());
    const attention = arrays.get("attention");
    const dimSize = (entry, dim) => (entry ? entry.shape[entry.dims.indexOf(dim)] : undefined);
    const q = arrays.get("q");
    const layers = await coordinate(listing, names, "layer", dimSize(attention ?? q, "layer") ?? 0);
    const heads = await coordinate(listing, names, "head", dimSize(attention ?? q, "head") ?? 0);
    return { listing, arrays, names, attention, layers, heads, sequences: listing.sequences ?? 1 };
  }

  function renderArrays(listing) {
    const total = listing.arrays.reduce((sum, entry) => sum + (arrayBytes(entry) || 0), 0);
    const rows = listing.arrays.map((entry) =>
      h(
        "tr",
        { dataset: { array: arrayName(entry) } },
        h("td", {}, h("code", {}, arrayName(entry))),
        h("td", {}, entry.dims.join(", ")),
        h("td", {}, entry.shape.join(" × ")),
        h("td", {}, entry.dtype),
        h("td", {}, (entry.chunks ?? []).join(" × ")),
        h("td", { className: "num" }, entry.derived ? "computed" : formatBytes(arrayBytes(entry))),
        h("td", {}, entry.derived ? "derived from q·k" : ""),
      ),
    );
    const note = [
      `format ${listing.format_version}`,
      listing.bulk ? `bulk job: ${listing.sequences} sequences (sizes of one micro-batch's arrays)` : `${listing.sequences} sequence${listing.sequences === 1 ? "" : "s"}`,
      `${formatBytes(total)} uncompressed`,
    ].join(" · ");
    arraysBox.replaceChildren(
      h("p", { className: "hint" }, note),
      h(
        "table",
        { className: "arrays-table" },
        h("thead", {}, h("tr", {}, ...["array", "dims", "shape", "dtype", "chunks", "size", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, ...rows),
      ),
    );
  }

  // -- pickers, heatmap, text, labels --------------------------------------------------------------

  const choice = { layer: 0, head: 0, seq: 0, pool: "max", scale: "linear" };
  let pickers = null;
  let tokenStrings = null;

  async function renderBundle() {
    const { attention, layers, heads, sequences, names } = bundle;
    choice.layer = layers[0] ?? 0;
    choice.head = heads[0] ?? 0;
    if (attention) {
      sections.attention.hidden = false;
      pickers = {
        layer: select("layer", layers.map((l) => [l, `layer ${l}`]), choice.layer),
        head: select("head", heads.map((x) => [x, `head ${x}`]), choice.head),
        seq: h("input", { type: "number", name: "seq", className: "picker picker-seq", min: 0, max: sequences - 1, value: 0 }),
        pool: select("pool", [["max", "max pool"], ["mean", "mean pool"]], choice.pool),
        scale: select("scale", [["linear", "linear 0–1"], ["sqrt", "sqrt"], ["log", "log 1e-4–1"]], choice.scale),
      };
      const button = (label, name, action) => {
        const b = h("button", { type: "button", className: `zoom-${name}`, title: name }, label);
        b.addEventListener("click", action);
        return b;
      };
      const controls = h(
        "div",
        { className: "controls" },
        pickers.layer,
        pickers.head,
        h("label", {}, "sequence ", pickers.seq, ` of ${sequences}`),
        pickers.pool,
        pickers.scale,
        button("+", "in", () => heatmap?.zoomBy(2)),
        button("−", "out", () => heatmap?.zoomBy(0.5)),
        button("fit", "fit", () => heatmap?.fit()),
        bundle.attention.derived ? h("span", { className: "badge" }, "derived: reconstructed from q and k") : null,
      );
      const status = h("p", { className: "hint heatmap-status" });
      const host = h("div", { className: "heatmap-host" });
      attentionBox.replaceChildren(controls, host, status);
      pickers.layer.addEventListener("change", () => pick({ layer: Number(pickers.layer.value) }));
      pickers.head.addEventListener("change", () => pick({ head: Number(pickers.head.value) }));
      pickers.seq.addEventListener("change", () => {
        const seq = Math.max(0, Math.min(sequences - 1, Math.floor(Number(pickers.seq.value) || 0)));
        pickers.seq.value = seq;
        pick({ seq });
      });
      pickers.pool.addEventListener("change", () => {
        choice.pool = pickers.pool.value;
        heatmap?.setPool(choice.pool);
      });
      pickers.scale.addEventListener("change", () => {
        choice.scale = pickers.scale.value;
        heatmap?.setColorScale(choice.scale);
      });
      attentionBox.host = host;
      attentionBox.status = status;
      await showHeatmap();
    } else {
      tokenStrings = await listedTokenStrings(0);
    }
    await showSequenceViews();
  }

  /** The tokens of sequence `seq` from the arrays route (GET .../arrays?seq= lists them). */
  async function listedTokenStrings(seq) {
    try {
      const listed = (await getJson(jobPath(jobId, `/arrays${query({ seq })}`))).token_strings;
      return Array.isArray(listed) ? listed : null;
    } catch (e) {
      console.warn(`token strings of sequence ${seq}: ${e.message}`);
      return null;
    }
  }

  async function pick(change) {
    const seqChanged = change.seq !== undefined && change.seq !== choice.seq;
    Object.assign(choice, change);
    if (pickers) {
      pickers.layer.value = String(choice.layer);
      pickers.head.value = String(choice.head);
    }
    if (bundle.attention) await showHeatmap();
    if (seqChanged) await showSequenceViews();
  }

  async function showHeatmap() {
    const { layer, head, seq } = choice;
    const base = `/tiles/${layer}/${head}/${seq}`;
    const status = attentionBox.status;
    status.textContent = "reading the pyramid…";
    let info;
    try {
      info = await getJson(jobPath(jobId, base));
    } catch (e) {
      status.textContent = `no heatmap: ${e.message}`;
      return;
    }
    tokenStrings = info.token_strings ?? (await listedTokenStrings(seq));
    const previous = heatmap && heatmap.tokens === info.tokens ? { ...heatmap.view } : null;
    heatmap?.destroy();
    heatmap = new Heatmap(attentionBox.host, {
      info,
      pool: choice.pool,
      colorScale: choice.scale,
      tilePath: (level, row, col, pool) => jobPath(jobId, `${base}/${level}/${row}/${col}${query({ pool, format: "npy" })}`),
      onChange: (s) => {
        status.textContent =
          `layer ${layer} · head ${head} · sequence ${seq} · ${info.tokens} tokens · level ${s.level} of ${info.levels} ` +
          `(${2 ** s.level}×${2 ** s.level} tokens per cell) · tiles: ${s.visibleTiles} on screen, ${s.loading} loading, ` +
          `${s.cachedTiles}/${s.maxCachedTiles} cached${s.labelsDrawn ? " · token labels" : " · zoom in for token labels"}` +
          (s.lastError ? ` · last error: ${s.lastError}` : "");
      },
    });
    if (previous) {
      heatmap.view = previous;
      heatmap.requestDraw();
    }
    window.qkvault.heatmap = heatmap;
  }

  async function showSequenceViews() {
    const seq = choice.seq;
    const ctx = { jobId, names: bundle.names, arrays: bundle.arrays, layers: bundle.layers, heads: bundle.heads };
    if (tokenStrings) {
      sections.text.hidden = false;
      try {
        await renderText(textBox, ctx, seq, tokenStrings);
      } catch (e) {
        textBox.replaceChildren(h("p", { className: "error" }, `cannot show the text: ${e.message}`));
      }
    }
    if (bundle.names.has("summary/label")) {
      sections.labels.hidden = false;
      try {
        await renderLabels(labelsBox, ctx, seq, (layer, head) => pick({ layer, head }));
      } catch (e) {
        labelsBox.replaceChildren(h("p", { className: "error" }, `cannot show the labels: ${e.message}`));
      }
    }
  }

  return () => {
    live.stop();
    heatmap?.destroy();
    heatmap = null;
    if (window.qkvault.heatmap) window.qkvault.heatmap = null;
  };
}

