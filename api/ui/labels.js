// The per-head label grid (layer x head) of the bundle's summary group (summary/label, one label
// per head and sequence; docs/research-capture.md), read with the slices route as JSON.

import { getJson, jobPath, query } from "./api.js";
import { h } from "./format.js";

// storage/bundle/labels.py LABELS, in the labels' first-match order
const LABEL_COLORS = {
  uniform: "#9e9e9e",
  previous_token: "#e6194b",
  sink: "#3cb44b",
  local: "#4363d8",
  streaming: "#f58231",
  retrieval_candidate: "#911eb4",
  scattered: "#42d4f4",
  mixed: "#f032e6",
  undetermined: "#ffffff",
};

/**
 * Render the label grid of sequence `seq` into `target`; onPick(layer, head) when a cell is clicked.
 * @param {number[]} layers, heads: the real indices along the grid's axes
 */
export async function renderLabels(target, { jobId, layers, heads }, seq, onPick) {
  const answer = await getJson(jobPath(jobId, `/arrays/summary/label${query({ seq, format: "json" })}`));
  const grid = answer.data; // [layer][head]
  const counts = new Map();
  const table = h(
    "table",
    { className: "label-grid" },
    h("tr", {}, h("th", {}, "layer \\ head"), ...grid[0].map((_, j) => h("th", {}, String(heads[j] ?? j)))),
    ...grid.map((row, i) =>
      h(
        "tr",
        {},
        h("th", {}, String(layers[i] ?? i)),
        ...row.map((label, j) => {
          counts.set(label, (counts.get(label) ?? 0) + 1);
          const cell = h("td", {
            className: "label-cell",
            title: `layer ${layers[i] ?? i}, head ${heads[j] ?? j}: ${label} (click: show its attention)`,
            dataset: { label, layer: String(layers[i] ?? i), head: String(heads[j] ?? j) },
          });
          cell.style.background = LABEL_COLORS[label] ?? "#000";
          cell.addEventListener("click", () => onPick(layers[i] ?? i, heads[j] ?? j));
          return cell;
        }),
      ),
    ),
  );
  const legend = h(
    "div",
    { className: "legend" },
    ...[...counts.entries()].map(([label, count]) => {
      const swatch = h("span", { className: "swatch" });
      swatch.style.background = LABEL_COLORS[label] ?? "#000";
      return h("span", { className: "legend-item" }, swatch, `${label} ${count}`);
    }),
  );
  target.replaceChildren(table, legend);
}
