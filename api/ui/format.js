// Small DOM and text helpers shared by the views.

/** document.createElement with properties and children: h("td", {className: "x"}, "text", node). */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(element.dataset, value);
    else if (name in element) element[name] = value;
    else element.setAttribute(name, value);
  }
  element.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

export function formatBytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value >= 100 ? 0 : 1)} ${units[unit]}`;
}

export function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

/** "12 / 40 units (30%) · decoding" */
export function progressText(job) {
  const p = job.progress || {};
  const parts = [];
  if (p.units_total > 0) {
    const percent = p.fraction === null || p.fraction === undefined ? "" : ` (${Math.round(p.fraction * 100)}%)`;
    parts.push(`${p.units_done} / ${p.units_total} units${percent}`);
  }
  if (job.phase && !["succeeded", "failed", "cancelled"].includes(job.state)) parts.push(job.phase);
  return parts.join(" · ") || "–";
}

/** A <progress> bar and its text, updated in place by updateProgress. */
export function progressCell(job) {
  const cell = h("div", { className: "progress" }, h("progress", { max: 1 }), h("span", { className: "progress-text" }));
  updateProgress(cell, job);
  return cell;
}

export function updateProgress(cell, job) {
  const bar = cell.querySelector("progress");
  const fraction = job.progress?.fraction;
  if (job.state === "succeeded") bar.value = 1;
  else if (fraction === null || fraction === undefined) bar.removeAttribute("value");
  else bar.value = fraction;
  cell.querySelector(".progress-text").textContent = progressText(job);
}

export function stateBadge(state) {
  return h("span", { className: `state state-${state}` }, state);
}

export function modelName(job) {
  const id = job.spec?.model?.id ?? "";
  return id.length > 40 ? `…${id.slice(-39)}` : id;
}
