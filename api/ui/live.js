// Live job progress: server-sent events (GET /v1/jobs/{id}/events, read with fetch()) for up to
// MAX_STREAMS unfinished jobs, and polling every POLL_MS for the rest, or for all of them when the
// API has no events route or a stream fails.

import { ApiError, jobPath, stats, streamEvents } from "./api.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const MAX_STREAMS = 3; // a browser has 6 connections per host over HTTP/1.1: keep some for tiles
const POLL_MS = 2000;

export class LiveJobs {
  /**
   * @param {object} options onJob(job): a newer state of a job; poll(): Promise of the jobs to
   *   refresh when polling (the list page reads GET /v1/jobs, the job page its one job)
   */
  constructor({ onJob, poll }) {
    this.onJob = onJob;
    this.poll = poll;
    this.streams = new Map(); // job id -> AbortController
    this.eventsUnavailable = false;
    this.timer = null;
    this.stopped = false;
    this.mode = "idle"; // "events", "polling", "events+polling" or "idle": shown on the page
  }

  /** Follow the unfinished jobs among `jobs` (call again with each fresh list). */
  update(jobs) {
    if (this.stopped) return;
    for (const job of jobs) {
      if (TERMINAL.has(job.state) && this.streams.has(job.id)) {
        this.streams.get(job.id).abort();
        this.streams.delete(job.id);
      }
    }
    const open = jobs.filter((job) => !TERMINAL.has(job.state));
    if (!this.eventsUnavailable) {
      for (const job of open) {
        if (!this.streams.has(job.id) && this.streams.size < MAX_STREAMS) this.follow(job.id);
      }
    }
    const uncovered = open.some((job) => !this.streams.has(job.id));
    if (uncovered) this.schedulePoll();
    this.mode =
      this.streams.size && uncovered ? "events+polling" : this.streams.size ? "events" : uncovered ? "polling" : "idle";
  }

  follow(jobId) {
    const controller = new AbortController();
    this.streams.set(jobId, controller);
    streamEvents(
      jobPath(jobId, "/events"),
      (type, data) => {
        if (type !== "job" && type !== "end") return;
        try {
          this.onJob(JSON.parse(data));
        } catch (error) {
          console.warn("unreadable event", error);
        }
      },
      controller.signal,
    )
      .catch((error) => {
        if (controller.signal.aborted) return;
        // no events route on this server (404/405): poll from now on
        if (error instanceof ApiError && (error.status === 404 || error.status === 405)) this.eventsUnavailable = true;
        else console.warn(`event stream of ${jobId} failed: ${error.message}`);
      })
      .finally(() => {
        if (this.streams.get(jobId) !== controller) return;
        this.streams.delete(jobId);
        // the stream ended (job finished, server closed it, or it failed): a poll decides what next
        if (!this.stopped) this.schedulePoll();
      });
  }

  schedulePoll() {
    if (this.timer !== null || this.stopped) return;
    this.timer = setTimeout(async () => {
      this.timer = null;
      if (this.stopped) return;
      let jobs = [];
      try {
        stats.jobPolls += 1;
        jobs = await this.poll();
        for (const job of jobs) this.onJob(job);
      } catch (error) {
        console.warn(`polling failed: ${error.message}`);
        this.schedulePoll();
        return;
      }
      this.update(jobs);
    }, POLL_MS);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    for (const controller of this.streams.values()) controller.abort();
    this.streams.clear();
  }
}
