// HCNR dashboard: live updates over server-sent events. Plain JavaScript, no build step.
"use strict";

function setProgress(el, value) {
  if (!el) return;
  el.value = value;
  el.textContent = Math.round(100 * value) + "%";
}

function setStatus(el, status) {
  if (!el) return;
  el.textContent = status;
  el.className = "status status-" + status;
}

function liveJobsList(table) {
  const live = document.getElementById("live-status");
  const source = new EventSource(table.dataset.stream);
  source.addEventListener("jobs", (message) => {
    let unknown = 0;
    for (const job of JSON.parse(message.data)) {
      const row = table.querySelector('tr[data-job-id="' + CSS.escape(job.id) + '"]');
      if (!row) { unknown += 1; continue; }
      setStatus(row.querySelector('[data-field="status"]'), job.status);
      row.querySelector('[data-field="stage"]').textContent = job.stage || "";
      setProgress(row.querySelector('[data-field="progress"]'), job.progress);
      row.querySelector('[data-field="percent"]').textContent = Math.round(100 * job.progress) + "%";
    }
    if (unknown && live) {
      live.innerHTML = "";
      const link = document.createElement("a");
      link.href = window.location.href;
      link.textContent = "New jobs: reload the list";
      live.appendChild(link);
    }
  });
  source.onerror = () => { if (live && !live.textContent) live.textContent = "Live updates paused; retrying."; };
  source.onopen = () => { if (live && live.textContent.startsWith("Live updates")) live.textContent = ""; };
}

function liveJob(section) {
  const live = document.getElementById("job-live");
  const log = document.getElementById("event-log");
  const source = new EventSource(section.dataset.stream);
  source.addEventListener("job", (message) => {
    const job = JSON.parse(message.data);
    setStatus(document.getElementById("job-status"), job.status);
    document.getElementById("job-stage").textContent = job.stage || "–";
    setProgress(document.getElementById("job-progress"), job.progress);
    document.getElementById("job-percent").textContent = Math.round(100 * job.progress) + "%";
    const eta = document.getElementById("job-eta");
    eta.textContent = job.eta_seconds == null ? "" : "ETA " + Math.round(job.eta_seconds) + " s";
  });
  source.addEventListener("log", (message) => {
    const event = JSON.parse(message.data);
    if (log.querySelector('li[data-event-id="' + event.id + '"]')) return;
    const item = document.createElement("li");
    item.dataset.eventId = event.id;
    item.textContent = event.created_at.slice(11, 19) + " " + event.type + " " +
      (event.stage ? "[" + event.stage + "] " : "") + event.message;
    log.appendChild(item);
    log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("end", (message) => {
    source.close();
    const status = JSON.parse(message.data).status;
    if (live) live.textContent = "Job " + status + "; loading the results.";
    window.location.reload();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("jobs");
  if (table && table.dataset.stream) liveJobsList(table);
  const section = document.getElementById("overview");
  if (section && section.dataset.terminal === "false") liveJob(section);
});
