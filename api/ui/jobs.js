// View "my jobs": GET /v1/jobs as a table, state and progress kept live (live.js).

import { getJson } from "./api.js";
import { formatBytes, formatTime, h, modelName, progressCell, stateBadge, updateProgress } from "./format.js";
import { LiveJobs } from "./live.js";

const PAGE = 100;
const REFRESH_MS = 15000; // new jobs show up within this even when every listed job has finished

export function jobsView(main) {
  const status = h("p", { className: "status" }, "loading jobs…");
  const body = h("tbody");
  const table = h(
    "table",
    { className: "jobs" },
    h(
      "thead",
      {},
      h("tr", {}, ...["job", "label", "model", "state", "progress", "written", "created"].map((t) => h("th", {}, t))),
    ),
    body,
  );
  const liveNote = h("p", { className: "hint live-mode" });
  main.replaceChildren(h("section", {}, h("h2", {}, "My jobs"), status, table, liveNote));

  const rows = new Map(); // job id -> {row, cells}
  const render = (job) => {
    let entry = rows.get(job.id);
    if (!entry) {
      const cells = {
        state: h("td", { className: "job-state" }),
        progress: progressCell(job),
        written: h("td", { className: "job-written" }),
      };
      const row = h(
        "tr",
        { dataset: { jobId: job.id } },
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, title: job.id }, job.id.slice(0, 8))),
        h("td", {}, job.label ?? ""),
        h("td", { className: "model", title: job.spec?.model?.id ?? "" }, modelName(job)),
        cells.state,
        h("td", {}, cells.progress),
        cells.written,
        h("td", {}, formatTime(job.created_at)),
      );
      entry = { row, cells };
      rows.set(job.id, entry);
    }
    entry.cells.state.replaceChildren(stateBadge(job.state));
    entry.row.dataset.state = job.state;
    updateProgress(entry.cells.progress, job);
    entry.cells.written.textContent = formatBytes(job.progress?.bytes_written ?? 0);
    return entry.row;
  };

  const fetchJobs = async () => (await getJson(`v1/jobs?limit=${PAGE}`)).items;
  const live = new LiveJobs({
    onJob: (job) => {
      if (rows.has(job.id)) render(job);
      liveNote.textContent = `live updates: ${live.mode}`;
    },
    poll: async () => {
      const jobs = await fetchJobs();
      // new jobs appear at the top (newest first)
      jobs.forEach((job, i) => {
        if (!rows.has(job.id)) body.insertBefore(render(job), body.children[i] ?? null);
      });
      return jobs;
    },
  });

  fetchJobs()
    .then((jobs) => {
      body.replaceChildren(...jobs.map(render));
      status.textContent = jobs.length
        ? `${jobs.length} job${jobs.length === 1 ? "" : "s"}${jobs.length === PAGE ? " (the newest)" : ""}`
        : "no jobs yet: submit one with `qkvault submit` or POST /v1/jobs";
      live.update(jobs);
      liveNote.textContent = `live updates: ${live.mode}`;
    })
    .catch((error) => {
      status.textContent = `could not list jobs: ${error.message}`;
      status.classList.add("error");
    });

  const refresh = setInterval(() => {
    live.poll().then(
      (jobs) => {
        jobs.forEach(render);
        live.update(jobs);
      },
      () => {},
    );
  }, REFRESH_MS);
  return () => {
    clearInterval(refresh);
    live.stop();
  };
}
