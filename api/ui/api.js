// Talking to the qkvault API from the page: the API key, fetch() with the bearer header, problem
// documents as errors, .npy parsing and server-sent events read from a fetch() stream (EventSource
// cannot send an Authorization header).

const KEY_STORAGE = "qkvault.apiKey";
// The page lives at <root>/ui/: the API is one level up (works behind a --root-path prefix too).
const API_BASE = new URL("../", document.baseURI);

// Counters the page's own tests read (tests/ui): how many requests of each kind the page made.
export const stats = {
  requests: 0,
  tileRequests: [], // paths of every tile fetched, in order
  jobPolls: 0, // GET /v1/jobs (the list) and GET /v1/jobs/{id} reads for live progress
  eventMessages: 0, // server-sent events received
  streamsOpened: 0,
};

export function getKey() {
  return localStorage.getItem(KEY_STORAGE);
}

export function setKey(key) {
  localStorage.setItem(KEY_STORAGE, key.trim());
}

export function forgetKey() {
  localStorage.removeItem(KEY_STORAGE);
}

/** An API error: the HTTP status and the RFC 9457 problem document (or a stand-in). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function problemOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { title: response.statusText, detail: text.slice(0, 300) || `HTTP ${response.status}` };
  }
}

/** fetch() a path of the API ("v1/jobs", relative to the API's root) with the stored key; throws ApiError for any non-2xx answer. */
export async function apiFetch(path, { signal, accept } = {}) {
  const headers = {};
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (accept) headers.Accept = accept;
  stats.requests += 1;
  const response = await fetch(new URL(path, API_BASE), { headers, signal, cache: "no-store" });
  if (!response.ok) {
    const error = new ApiError(response.status, await problemOf(response));
    if (response.status === 401) window.dispatchEvent(new CustomEvent("qkvault:unauthorized", { detail: error }));
    throw error;
  }
  return response;
}

export async function getJson(path, options) {
  return (await apiFetch(path, options)).json();
}

/** A .npy body as {shape, dtype, data}: float16 is widened to a Float32Array. */
export async function getNpy(path, options) {
  return parseNpy(await (await apiFetch(path, { ...options, accept: "application/x-npy" })).arrayBuffer());
}

const NPY_MAGIC = "\x93NUMPY";

/** Parse a .npy file (format 1.0-3.0, little-endian numbers, C order). */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.subarray(0, 6));
  if (magic !== NPY_MAGIC) throw new Error("not a .npy file (bad magic)");
  const major = bytes[6];
  const view = new DataView(buffer);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const headerStart = major === 1 ? 10 : 12;
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
    bytes.subarray(headerStart, headerStart + headerLength),
  );
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || shapeText === undefined) throw new Error(`unreadable .npy header: ${header}`);
  if (fortran) throw new Error(".npy in Fortran order is not supported");
  const shape = shapeText
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s.length > 0)
    .map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = headerStart + headerLength;
  const body = buffer.slice(offset); // a fresh buffer: typed arrays need aligned offsets
  const types = {
    "<f4": Float32Array,
    "<f8": Float64Array,
    "<i4": Int32Array,
    "<i8": BigInt64Array,
    "|u1": Uint8Array,
    "|i1": Int8Array,
    "|b1": Uint8Array,
  };
  let data;
  if (descr === "<f2") data = float16ToFloat32(new Uint16Array(body, 0, count));
  else if (types[descr]) data = new types[descr](body, 0, count);
  else throw new Error(`.npy dtype ${descr} is not supported by the viewer`);
  return { shape, dtype: descr, data };
}

function float16ToFloat32(halves) {
  const out = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i++) {
    const h = halves[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const fraction = h & 0x3ff;
    if (exponent === 0) out[i] = sign * 2 ** -14 * (fraction / 1024);
    else if (exponent === 31) out[i] = fraction ? NaN : sign * Infinity;
    else out[i] = sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }
  return out;
}

/**
 * Read a text/event-stream with fetch(): calls onEvent(type, data) for each message until the
 * stream ends or `signal` aborts. Comments (": keep-alive") are skipped.
 */
export async function streamEvents(path, onEvent, signal) {
  const response = await apiFetch(path, { signal, accept: "text/event-stream" });
  stats.streamsOpened += 1;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) {
        stats.eventMessages += 1;
        onEvent(type, data.join("\n"));
      }
    }
  }
}

/** Query string of the defined entries of `params`. */
export function query(params) {
  const entries = Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== "");
  return entries.length ? `?${new URLSearchParams(entries.map(([k, v]) => [k, String(v)]))}` : "";
}

export function jobPath(jobId, rest = "") {
  return `v1/jobs/${encodeURIComponent(jobId)}${rest}`;
}
