// docworker dashboard: the token for actions (kept in this tab's
// sessionStorage only), the action buttons, and live updates from
// /ui/events. Everything from the server goes into the page as text
// (textContent, value), never as markup.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const tokenInput = document.getElementById("token");
  const tokenState = document.getElementById("token-state");
  const KEY = "docworker-dashboard-token";

  function token() {
    return sessionStorage.getItem(KEY) || "";
  }
  function showTokenState() {
    tokenState.textContent = token() ? "token set for this tab" : "no token: read-only";
  }
  document.getElementById("token-use").addEventListener("click", function () {
    sessionStorage.setItem(KEY, tokenInput.value.trim());
    tokenInput.value = "";
    showTokenState();
  });
  showTokenState();

  document.querySelectorAll("button[data-action]").forEach(function (button) {
    const result = button.parentElement.querySelector(".result");
    button.addEventListener("click", async function () {
      if (!token()) {
        result.textContent = "needs the dashboard token: enter it at the top of the page";
        result.className = "result refused";
        return;
      }
      button.disabled = true;
      try {
        const response = await fetch(button.dataset.action, {
          method: "POST",
          credentials: "same-origin",
          headers: { "Authorization": "Bearer " + token(), "X-CSRF-Token": csrf },
        });
        let message = response.statusText;
        try { message = (await response.json()).message; } catch (e) { /* not JSON */ }
        result.textContent = response.ok ? message : response.status + ": " + message;
        result.className = "result " + (response.ok ? "done" : "refused");
      } catch (e) {
        result.textContent = "no answer: " + e;
        result.className = "result refused";
      } finally {
        button.disabled = false;
      }
    });
  });

  // Live updates of what this page shows.
  function ids(attribute) {
    const seen = new Set();
    document.querySelectorAll("[" + attribute + "]").forEach(function (e) {
      seen.add(e.getAttribute(attribute));
    });
    return Array.from(seen).slice(0, 100).join(",");
  }
  function each(selector, fn) {
    document.querySelectorAll(selector).forEach(fn);
  }
  const live = document.getElementById("live");
  const source = new EventSource(
    "/ui/events?batches=" + encodeURIComponent(ids("data-batch")) +
    "&jobs=" + encodeURIComponent(ids("data-job")));
  source.addEventListener("update", function (event) {
    const d = JSON.parse(event.data);
    Object.keys(d.counts).forEach(function (status) {
      each('[data-count="' + CSS.escape(status) + '"]', function (e) { e.textContent = String(d.counts[status]); });
    });
    each("[data-due]", function (e) { e.textContent = String(d.due); });
    each("[data-oldest]", function (e) { e.textContent = d.oldest; });
    d.batches.forEach(function (b) {
      const id = CSS.escape(b.id);
      each('progress[data-batch="' + id + '"]', function (e) {
        e.max = Math.max(b.total, 1);
        e.value = b.completed + b.failed;
      });
      each('[data-batch-text="' + id + '"]', function (e) {
        e.textContent = b.completed + " completed, " + b.failed + " failed of " + b.total;
      });
      each('[data-batch-status="' + id + '"]', function (e) { e.textContent = b.status; });
    });
    d.jobs.forEach(function (j) {
      const id = CSS.escape(j.id);
      each('progress[data-job="' + id + '"]', function (e) {
        e.max = Math.max(j.total, 1);
        e.value = j.completed;
      });
      each('[data-job-text="' + id + '"]', function (e) { e.textContent = j.completed + "/" + j.total; });
      each('[data-job-status="' + id + '"]', function (e) {
        // On a job's own page a new status brings new timings, messages and
        // history: read the page again.
        if (e.tagName === "DD" && e.textContent !== j.status) {
          setTimeout(function () { location.reload(); }, 300);
        }
        e.textContent = j.status;
      });
      each('[data-job-stage="' + id + '"]', function (e) { e.textContent = j.stage || ""; });
      each('[data-job-attempt="' + id + '"]', function (e) { e.textContent = String(j.attempt); });
    });
    live.textContent = "live updates: " + new Date().toLocaleTimeString();
  });
  source.addEventListener("trouble", function (event) {
    live.textContent = "live updates: " + event.data;
  });
  source.onerror = function () {
    live.textContent = "live updates: disconnected, retrying";
  };
})();
