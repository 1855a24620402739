// A zoomable, pannable attention heatmap drawn on a canvas from the API's 256 x 256 float32 tiles
// (GET /v1/jobs/{id}/tiles/{layer}/{head}/{seq}/{level}/{row}/{col}?format=npy).
//
// Level L of the pyramid pools 2^L x 2^L tokens per cell; the view draws the coarsest level whose
// cells are still at least one device pixel, so a 128K-token matrix and a 100-token one cost the
// same: the tiles on screen. Tiles live in an LRU of MAX_CACHED_TILES (float32 values for the
// tooltip + their RGBA image): the page's memory is bounded by that, never by T².
// Rows are queries, columns keys; tiles entirely above the diagonal (keys after every query of the
// tile) are causal zeros and are drawn without a request.

import { getNpy, stats } from "./api.js";
import { colorize, cssColor } from "./colormap.js";

const TILE = 256; // cells per tile side (the API's tile size)
export const MAX_CACHED_TILES = 64; // 64 x (256 KiB of float32 + 256 KiB of RGBA) = 32 MiB at most
const MAX_IN_FLIGHT = 4; // browsers open 6 connections per host: leave room for the rest
const RETRY_FAILED_MS = 3000;
const LABEL_MIN_PX = 12; // token labels are drawn once a token is at least this many CSS pixels
const MAX_PX_PER_TOKEN = 64;
const MARGIN = { left: 112, top: 96, right: 8, bottom: 8 }; // room for the token labels
const BACKGROUND = "#e8e8e8";

/** How a token string is shown: whitespace made visible, long ones cut. */
export function visibleToken(text, max = 14) {
  const shown = String(text ?? "").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
  return shown.length > max ? `${shown.slice(0, max - 1)}…` : shown;
}

export class Heatmap {
  /**
   * @param {HTMLElement} container where the canvas and its tooltip go
   * @param {object} options info: the tiles route's pyramid info; tilePath(level, row, col, pool)
   *   -> API path; pool: "max" | "mean"; colorScale: "linear" | "sqrt" | "log";
   *   onChange(snapshot) after each draw; maxCachedTiles: the LRU's size
   */
  constructor(
    container,
    { info, tilePath, pool = "max", colorScale = "linear", onChange, maxCachedTiles = MAX_CACHED_TILES },
  ) {
    this.info = info;
    this.maxCachedTiles = maxCachedTiles;
    this.tokens = info.tokens;
    this.levels = info.levels;
    this.tilePath = tilePath;
    this.pool = pool;
    this.colorScale = colorScale;
    this.onChange = onChange;
    this.cache = new Map(); // "level/row/col" -> tile; Map order = least recently used first
    this.inFlight = new Map(); // key -> AbortController
    this.failed = new Map(); // key -> {time, message}
    this.wanted = [];
    this.visibleKeys = new Set();
    this.labelsDrawn = 0;
    this.level = 0;
    this.lastError = null;

    this.root = document.createElement("div");
    this.root.className = "heatmap";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "heatmap-canvas";
    this.tooltip = document.createElement("div");
    this.tooltip.className = "heatmap-tooltip";
    this.tooltip.hidden = true;
    this.root.append(this.canvas, this.tooltip);
    container.append(this.root);

    this.events = new AbortController();
    const on = (target, type, handler, options = {}) =>
      target.addEventListener(type, handler, { ...options, signal: this.events.signal });
    on(this.canvas, "wheel", (e) => this.onWheel(e), { passive: false });
    on(this.canvas, "pointerdown", (e) => this.onPointerDown(e));
    on(this.canvas, "pointermove", (e) => this.onPointerMove(e));
    on(this.canvas, "pointerup", (e) => this.onPointerUp(e));
    on(this.canvas, "pointerleave", () => this.hideTooltip());
    on(this.canvas, "dblclick", (e) => this.zoomAt(this.eventPoint(e), 2));
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.root);
    this.resize();
    this.fit();
  }

  destroy() {
    this.events.abort();
    this.resizer.disconnect();
    for (const controller of this.inFlight.values()) controller.abort();
    this.inFlight.clear();
    this.cache.clear();
    this.root.remove();
  }

  // -- geometry ------------------------------------------------------------------------------------

  resize() {
    const width = Math.max(200, Math.floor(this.root.clientWidth));
    const height = Math.max(200, Math.floor(this.root.clientHeight));
    const dpr = window.devicePixelRatio || 1;
    this.width = width;
    this.height = height;
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.plot = {
      left: MARGIN.left,
      top: MARGIN.top,
      width: width - MARGIN.left - MARGIN.right,
      height: height - MARGIN.top - MARGIN.bottom,
    };
    if (this.view) this.requestDraw();
  }

  fitScale() {
    return Math.min(this.plot.width, this.plot.height) / this.tokens;
  }

  /** Show the whole matrix. */
  fit() {
    this.view = { scale: this.fitScale(), ox: 0, oy: 0 }; // CSS px per token; token at plot's top-left
    this.requestDraw();
  }

  zoomBy(factor) {
    this.zoomAt({ x: this.plot.left + this.plot.width / 2, y: this.plot.top + this.plot.height / 2 }, factor);
  }

  /** Zoom by `factor` keeping the token under canvas point {x, y} in place. */
  zoomAt(point, factor) {
    const { scale, ox, oy } = this.view;
    const key = ox + (point.x - this.plot.left) / scale;
    const query = oy + (point.y - this.plot.top) / scale;
    const next = Math.min(MAX_PX_PER_TOKEN, Math.max(this.fitScale() / 2, scale * factor));
    this.view = {
      scale: next,
      ox: key - (point.x - this.plot.left) / next,
      oy: query - (point.y - this.plot.top) / next,
    };
    this.clampView();
    this.requestDraw();
  }

  /** Put token (query, key) at the centre of the plot at `scale` CSS pixels per token. */
  centerOn(query, key, scale = this.view.scale) {
    const next = Math.min(MAX_PX_PER_TOKEN, Math.max(this.fitScale() / 2, scale));
    this.view = {
      scale: next,
      ox: key - this.plot.width / 2 / next,
      oy: query - this.plot.height / 2 / next,
    };
    this.clampView();
    this.requestDraw();
  }

  clampView() {
    const v = this.view;
    const viewW = this.plot.width / v.scale;
    const viewH = this.plot.height / v.scale;
    v.ox = Math.min(Math.max(v.ox, -viewW / 2), this.tokens - viewW / 2);
    v.oy = Math.min(Math.max(v.oy, -viewH / 2), this.tokens - viewH / 2);
  }

  /** Canvas CSS point of fractional token coordinates (query, key). */
  screenPoint(query, key) {
    return {
      x: this.plot.left + (key - this.view.ox) * this.view.scale,
      y: this.plot.top + (query - this.view.oy) * this.view.scale,
    };
  }

  /** Token (query, key) under canvas CSS point, or null outside the matrix. */
  tokenAt(point) {
    const { scale, ox, oy } = this.view;
    if (point.x < this.plot.left || point.y < this.plot.top) return null;
    const key = Math.floor(ox + (point.x - this.plot.left) / scale);
    const query = Math.floor(oy + (point.y - this.plot.top) / scale);
    if (key < 0 || query < 0 || key >= this.tokens || query >= this.tokens) return null;
    return { query, key };
  }

  eventPoint(event) {
    const rect = this.canvas.getBoundingClientRect();
    return { x: event.clientX - rect.left, y: event.clientY - rect.top };
  }

  /** The pyramid level drawn at the current zoom: cells of at least one device pixel. */
  chooseLevel() {
    const devicePxPerToken = this.view.scale * (window.devicePixelRatio || 1);
    if (devicePxPerToken >= 1) return 0;
    return Math.min(this.levels - 1, Math.ceil(Math.log2(1 / devicePxPerToken) - 1e-9));
  }

  levelGrid(level) {
    const size = this.info.level_sizes[level]; // [rows, cols], or one number for a square level
    const [rows, cols] = Array.isArray(size) ? size : [size, size];
    return { rows, cols, tileRows: Math.ceil(rows / TILE), tileCols: Math.ceil(cols / TILE) };
  }

  /** Tiles (row, col) of `level` that intersect the plot. */
  visibleTiles(level) {
    const { scale, ox, oy } = this.view;
    const span = TILE * 2 ** level; // tokens per tile side
    const grid = this.levelGrid(level);
    const first = (start) => Math.max(0, Math.floor(start / span));
    const last = (start, length, count) =>
      Math.min(count - 1, Math.floor((Math.min(this.tokens, start + length / scale) - 1e-9) / span));
    const tiles = [];
    for (let row = first(oy); row <= last(oy, this.plot.height, grid.tileRows); row++) {
      for (let col = first(ox); col <= last(ox, this.plot.width, grid.tileCols); col++) {
        tiles.push({ level, row, col });
      }
    }
    return tiles;
  }

  // -- drawing ---------------------------------------------------------------------------------------

  requestDraw() {
    if (this.drawPending) return;
    this.drawPending = true;
    requestAnimationFrame(() => {
      this.drawPending = false;
      this.draw();
    });
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, this.width, this.height);
    const { left, top, width, height } = this.plot;
    const level = this.chooseLevel();
    this.level = level;
    const visible = this.visibleTiles(level);
    this.visibleKeys = new Set(visible.map((t) => this.key(t)));
    this.wanted = [];

    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    ctx.fillStyle = BACKGROUND;
    ctx.fillRect(left, top, width, height);
    // the matrix itself (cells past the last token stay background)
    const corner = this.screenPoint(0, 0);
    const side = this.tokens * this.view.scale;
    ctx.beginPath();
    ctx.rect(corner.x, corner.y, side, side);
    ctx.clip();
    ctx.imageSmoothingEnabled = false;
    // causal zeros first, on whole pixels: the tiles drawn over them leave no seam at their edges
    for (const tile of visible) if (tile.col > tile.row) this.fillCausalZeros(ctx, tile);
    for (const tile of visible) {
      if (tile.col > tile.row) continue;
      const cached = this.touch(this.key(tile));
      if (cached) {
        this.blit(ctx, cached, this.tokenRect(tile));
      } else {
        this.drawFromCoarser(ctx, tile);
        this.wanted.push(tile);
      }
    }
    ctx.restore();
    this.drawLabels(ctx);
    this.drawAxes(ctx);
    this.abortUnwanted();
    this.pump();
    this.onChange?.(this.snapshot());
  }

  key({ level, row, col }) {
    return `${level}/${row}/${col}`;
  }

  /** The token square a tile covers: [q0, q0 + span) x [k0, k0 + span). */
  tokenRect({ level, row, col }) {
    const span = TILE * 2 ** level;
    return { q0: row * span, k0: col * span, span };
  }

  fillCausalZeros(ctx, tile) {
    const { q0, k0, span } = this.tokenRect(tile);
    const at = this.screenPoint(q0, k0);
    const end = this.screenPoint(q0 + span, k0 + span);
    ctx.fillStyle = cssColor(0, this.colorScale);
    const [x, y] = [Math.floor(at.x), Math.floor(at.y)];
    ctx.fillRect(x, y, Math.ceil(end.x) - x, Math.ceil(end.y) - y);
  }

  /** Draw the part of `tile` inside token square `rect`. */
  blit(ctx, tile, rect) {
    const cell = 2 ** tile.level;
    const own = this.tokenRect(tile);
    const sx = (rect.k0 - own.k0) / cell;
    const sy = (rect.q0 - own.q0) / cell;
    const sw = Math.min(rect.span / cell, tile.cols - sx);
    const sh = Math.min(rect.span / cell, tile.rows - sy);
    if (sw <= 0 || sh <= 0) return;
    const at = this.screenPoint(rect.q0, rect.k0);
    const px = cell * this.view.scale;
    ctx.drawImage(tile.image, sx, sy, sw, sh, at.x, at.y, sw * px, sh * px);
  }

  /** While a tile loads, show the coarser level's cells that cover it, if cached. */
  drawFromCoarser(ctx, tile) {
    const rect = this.tokenRect(tile);
    for (let level = tile.level + 1; level < this.levels; level++) {
      const parentSpan = TILE * 2 ** level;
      const parent = {
        level,
        row: Math.floor(rect.q0 / parentSpan),
        col: Math.floor(rect.k0 / parentSpan),
      };
      const cached = this.cache.get(this.key(parent));
      if (cached) {
        this.blit(ctx, cached, rect);
        return;
      }
    }
  }

  drawLabels(ctx) {
    this.labelsDrawn = 0;
    const { scale } = this.view;
    const strings = this.info.token_strings || [];
    if (scale < LABEL_MIN_PX || strings.length === 0) return;
    const { left, top, width, height } = this.plot;
    const size = Math.min(12, Math.floor(scale - 2));
    ctx.save();
    ctx.font = `${size}px ui-monospace, monospace`;
    ctx.fillStyle = "#222";
    ctx.textBaseline = "middle";
    const firstQ = Math.max(0, Math.floor(this.view.oy));
    const lastQ = Math.min(this.tokens - 1, Math.floor(this.view.oy + height / scale));
    ctx.textAlign = "right";
    for (let q = firstQ; q <= lastQ; q++) {
      const y = this.screenPoint(q + 0.5, 0).y;
      if (y < top || y > top + height) continue;
      ctx.fillText(visibleToken(strings[q]), left - 4, y);
      this.labelsDrawn += 1;
    }
    const firstK = Math.max(0, Math.floor(this.view.ox));
    const lastK = Math.min(this.tokens - 1, Math.floor(this.view.ox + width / scale));
    ctx.textAlign = "left";
    for (let k = firstK; k <= lastK; k++) {
      const x = this.screenPoint(0, k + 0.5).x;
      if (x < left || x > left + width) continue;
      ctx.save();
      ctx.translate(x, top - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.fillText(visibleToken(strings[k]), 0, 0);
      ctx.restore();
      this.labelsDrawn += 1;
    }
    ctx.restore();
  }

  drawAxes(ctx) {
    ctx.save();
    ctx.fillStyle = "#555";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    if (this.labelsDrawn === 0) {
      ctx.fillText("key →", this.plot.left, this.plot.top - 16);
      ctx.save();
      ctx.translate(this.plot.left - 16, this.plot.top);
      ctx.rotate(Math.PI / 2);
      ctx.fillText("query →", 0, 0);
      ctx.restore();
    }
    ctx.restore();
  }

  // -- tiles -----------------------------------------------------------------------------------------

  /** The cached tile of `key`, marked most recently used; undefined if not cached. */
  touch(key) {
    const tile = this.cache.get(key);
    if (tile) {
      this.cache.delete(key);
      this.cache.set(key, tile);
    }
    return tile;
  }

  abortUnwanted() {
    const wanted = new Set(this.wanted.map((t) => this.key(t)));
    for (const [key, controller] of this.inFlight) {
      if (!wanted.has(key)) {
        controller.abort();
        this.inFlight.delete(key);
      }
    }
  }

  pump() {
    const now = Date.now();
    for (const tile of this.wanted) {
      if (this.inFlight.size >= MAX_IN_FLIGHT) break;
      const key = this.key(tile);
      const failure = this.failed.get(key);
      if (this.inFlight.has(key) || this.cache.has(key)) continue;
      if (failure && now - failure.time < RETRY_FAILED_MS) continue;
      this.load(tile, key);
    }
  }

  async load(tile, key) {
    const controller = new AbortController();
    this.inFlight.set(key, controller);
    const path = this.tilePath(tile.level, tile.row, tile.col, this.pool);
    stats.tileRequests.push(path);
    try {
      const npy = await getNpy(path, { signal: controller.signal });
      if (npy.shape.length !== 2 || npy.shape[0] !== TILE || npy.shape[1] !== TILE) {
        throw new Error(`tile ${key}: expected ${TILE}x${TILE}, got ${npy.shape.join("x")}`);
      }
      const grid = this.levelGrid(tile.level);
      const entry = {
        ...tile,
        values: npy.data instanceof Float32Array ? npy.data : Float32Array.from(npy.data),
        rows: Math.min(TILE, grid.rows - tile.row * TILE), // cells of the matrix in this tile
        cols: Math.min(TILE, grid.cols - tile.col * TILE),
      };
      entry.image = this.render(entry);
      this.failed.delete(key);
      this.cache.set(key, entry);
      this.evict();
    } catch (error) {
      if (controller.signal.aborted) return;
      this.failed.set(key, { time: Date.now(), message: error.message });
      this.lastError = error.message;
      setTimeout(() => this.requestDraw(), RETRY_FAILED_MS);
    } finally {
      if (this.inFlight.get(key) === controller) this.inFlight.delete(key);
    }
    this.requestDraw();
  }

  render(tile) {
    const image = document.createElement("canvas");
    image.width = TILE;
    image.height = TILE;
    const ctx = image.getContext("2d");
    const pixels = ctx.createImageData(TILE, TILE);
    colorize(tile.values, TILE, TILE, this.colorScale, pixels.data);
    ctx.putImageData(pixels, 0, 0);
    return image;
  }

  /** Drop least recently used tiles past maxCachedTiles (never one on screen). */
  evict() {
    for (const key of this.cache.keys()) {
      if (this.cache.size <= this.maxCachedTiles) break;
      if (!this.visibleKeys.has(key)) this.cache.delete(key);
    }
  }

  setPool(pool) {
    if (pool === this.pool) return;
    this.pool = pool;
    for (const controller of this.inFlight.values()) controller.abort();
    this.inFlight.clear();
    this.cache.clear();
    this.failed.clear();
    this.requestDraw();
  }

  setColorScale(name) {
    if (name === this.colorScale) return;
    this.colorScale = name;
    for (const tile of this.cache.values()) tile.image = this.render(tile);
    this.requestDraw();
  }

  // -- pointer -------------------------------------------------------------------------------------

  onWheel(event) {
    event.preventDefault();
    const delta = event.deltaMode === 1 ? event.deltaY * 16 : event.deltaY;
    this.zoomAt(this.eventPoint(event), Math.exp(-delta * 0.0015));
  }

  onPointerDown(event) {
    this.drag = { x: event.clientX, y: event.clientY, ox: this.view.ox, oy: this.view.oy };
    this.canvas.setPointerCapture(event.pointerId);
  }

  onPointerMove(event) {
    if (this.drag) {
      const { scale } = this.view;
      this.view.ox = this.drag.ox - (event.clientX - this.drag.x) / scale;
      this.view.oy = this.drag.oy - (event.clientY - this.drag.y) / scale;
      this.clampView();
      this.requestDraw();
      return;
    }
    this.showTooltip(this.eventPoint(event));
  }

  onPointerUp(event) {
    this.drag = null;
    if (this.canvas.hasPointerCapture(event.pointerId)) this.canvas.releasePointerCapture(event.pointerId);
  }

  hideTooltip() {
    this.tooltip.hidden = true;
  }

  /** The value shown for token (query, key): from the drawn level if loaded, else the finest loaded. */
  valueAt(query, key) {
    if (key > query) return { level: 0, value: 0, masked: true };
    const levels = [this.level, ...Array.from({ length: this.levels }, (_, i) => i)];
    for (const level of levels) {
      const cell = 2 ** level;
      const r = Math.floor(query / cell);
      const c = Math.floor(key / cell);
      const tile = this.cache.get(`${level}/${Math.floor(r / TILE)}/${Math.floor(c / TILE)}`);
      if (!tile) continue;
      const value = tile.values[(r % TILE) * TILE + (c % TILE)];
      return {
        level,
        value,
        queries: [r * cell, Math.min(this.tokens, (r + 1) * cell)],
        keys: [c * cell, Math.min(this.tokens, (c + 1) * cell)],
      };
    }
    return null;
  }

  showTooltip(point) {
    const at = this.tokenAt(point);
    const found = at && this.valueAt(at.query, at.key);
    if (!at || !found) {
      this.hideTooltip();
      return;
    }
    const strings = this.info.token_strings || [];
    const tip = this.tooltip;
    tip.dataset.query = at.query;
    tip.dataset.key = at.key;
    tip.dataset.value = found.value;
    tip.dataset.level = found.level;
    tip.dataset.x = point.x; // canvas CSS pixels of the pointer
    tip.dataset.y = point.y;
    const head = `query ${at.query} ${JSON.stringify(strings[at.query] ?? "")} · key ${at.key} ${JSON.stringify(strings[at.key] ?? "")}`;
    let detail;
    if (found.masked) detail = "0 (the key comes after the query: masked)";
    else if (found.level === 0) detail = formatValue(found.value);
    else {
      const [q0, q1] = found.queries;
      const [k0, k1] = found.keys;
      detail = `${this.pool} of queries ${q0}–${q1 - 1} × keys ${k0}–${k1 - 1}: ${formatValue(found.value)}`;
    }
    tip.replaceChildren(
      Object.assign(document.createElement("div"), { className: "tip-tokens", textContent: head }),
      Object.assign(document.createElement("div"), { className: "tip-value", textContent: detail }),
    );
    tip.hidden = false;
    const x = Math.min(point.x + 14, this.width - tip.offsetWidth - 4);
    const y = point.y + 14 + tip.offsetHeight > this.height ? point.y - tip.offsetHeight - 8 : point.y + 14;
    tip.style.left = `${Math.max(0, x)}px`;
    tip.style.top = `${Math.max(0, y)}px`;
  }

  /** What the tests and the status line read. */
  snapshot() {
    return {
      level: this.level,
      scale: this.view.scale,
      ox: this.view.ox,
      oy: this.view.oy,
      tokens: this.tokens,
      plot: { ...this.plot },
      visibleTiles: this.visibleKeys.size,
      loading: this.wanted.length,
      cachedTiles: this.cache.size,
      maxCachedTiles: this.maxCachedTiles,
      labelsDrawn: this.labelsDrawn,
      lastError: this.lastError,
    };
  }
}

export function formatValue(v) {
  if (Number.isNaN(v)) return "n/a";
  if (v === 0) return "0";
  return Math.abs(v) >= 1e-3 ? v.toFixed(4) : v.toExponential(3);
}
