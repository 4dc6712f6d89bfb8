// muster dashboard: live updates from the hub's event stream (SSE), with a
// Live / Reconnecting / Stale badge, polling as a fallback, and no stream
// while the tab is hidden; the actions admins get (drain, cancel, requeue,
// submit); relative times kept fresh; a task's live log. Sent as a file of
// its own so the page's Content-Security-Policy allows no inline script.
// Text from the hub is only ever set with textContent, never as HTML.
"use strict";

(function () {
  // A login link posts itself: opening it does not use it up, signing in does.
  const login = document.getElementById("login-form");
  if (login) {
    login.submit();
    return;
  }

  const badge = document.getElementById("live");
  if (!badge) return;

  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";

  // === Messages to the person ===

  function flash(text, bad) {
    const el = document.getElementById("flash");
    if (!el) return;
    el.textContent = text;
    el.className = bad ? "bad" : "ok";
  }

  // The message of an API error body, or the status line.
  async function errorText(res) {
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) {
      // Not JSON: fall through to the status.
    }
    return "the hub answered " + res.status;
  }

  // === Live regions ===

  let source = null;
  let refreshTimer = null;
  let refreshing = false;
  let again = false;

  function setBadge(state, text) {
    badge.className = "badge " + state;
    badge.textContent = text;
  }

  // Re-renders the page's live regions from the server: the same HTML a
  // reload would give, swapped in place. One fetch at a time; events that
  // arrive meanwhile ask for one more.
  async function refresh() {
    refreshTimer = null;
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    try {
      const res = await fetch(location.href, { credentials: "same-origin" });
      if (res.status === 401 || (res.redirected && new URL(res.url).pathname === "/login")) {
        location.href = "/login";
        return;
      }
      if (!res.ok) return;
      const doc = new DOMParser().parseFromString(await res.text(), "text/html");
      for (const el of document.querySelectorAll("[data-live]")) {
        const fresh = doc.getElementById(el.id);
        if (fresh) el.replaceWith(document.importNode(fresh, true));
      }
      freshenTimes();
    } catch (e) {
      setBadge("stale", "Stale");
    } finally {
      refreshing = false;
      if (again) {
        again = false;
        scheduleRefresh();
      }
    }
  }

  function scheduleRefresh() {
    if (refreshTimer === null) refreshTimer = setTimeout(refresh, 150);
  }

  // EventSource resumes with Last-Event-ID by itself after a reconnect.
  function open() {
    if (source) return;
    source = new EventSource("/api/v1/events");
    source.onopen = () => setBadge("live", "Live");
    source.onmessage = () => scheduleRefresh();
    // A pruned gap: the page may have missed events, so re-render it.
    source.addEventListener("note", () => scheduleRefresh());
    source.onerror = (e) => {
      if (e && e.data) {
        // The hub ended the stream (the session's identity was revoked).
        close();
        location.href = "/login";
        return;
      }
      if (source && source.readyState === EventSource.CLOSED) {
        // Refused outright (a 4xx): the browser will not retry; polling takes over.
        source = null;
        setBadge("stale", "Stale");
      } else {
        setBadge("reconnecting", "Reconnecting");
      }
    };
  }

  function close() {
    if (source) {
      source.close();
      source = null;
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      close();
      closeLog();
      setBadge("stale", "Paused");
    } else {
      open();
      openLog();
      scheduleRefresh();
    }
  });

  // Fallback: while the stream is down, poll (and try the stream again).
  setInterval(() => {
    if (document.hidden) return;
    if (!source || source.readyState !== EventSource.OPEN) {
      if (!source) open();
      setBadge("stale", "Stale");
      scheduleRefresh();
    }
  }, 5000);

  // === Relative times ===

  function relative(ms) {
    const future = ms < 0;
    const s = Math.floor(Math.abs(ms) / 1000);
    let text;
    if (s < 60) text = s + " s";
    else if (s < 3600) text = Math.floor(s / 60) + " min";
    else if (s < 172800) text = Math.floor(s / 3600) + " h";
    else text = Math.floor(s / 86400) + " d";
    return future ? "in " + text : text + " ago";
  }

  function freshenTimes() {
    const now = Date.now();
    for (const el of document.querySelectorAll("time[datetime]")) {
      const t = Date.parse(el.getAttribute("datetime"));
      if (!Number.isNaN(t)) el.textContent = relative(now - t);
    }
  }
  setInterval(freshenTimes, 10000);

  // === Actions (admin sessions only get the buttons) ===

  async function post(url, body) {
    const headers = { "X-CSRF-Token": csrf };
    const init = { method: "POST", credentials: "same-origin", headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init);
  }

  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-post]");
    if (!button) return;
    ev.preventDefault();
    button.disabled = true;
    try {
      const res = await post(button.getAttribute("data-post"));
      if (res.ok) {
        flash(button.textContent.trim() + ": done", false);
      } else {
        flash(button.textContent.trim() + " refused: " + (await errorText(res)), true);
      }
    } catch (e) {
      flash("The hub could not be reached: " + e, true);
    } finally {
      button.disabled = false;
      scheduleRefresh();
    }
  });

  function list(text) {
    return text
      .split(",")
      .map((s) => s.trim())
      .filter((s) => s.length > 0);
  }

  const submitForm = document.getElementById("submit-form");
  if (submitForm) {
    submitForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const f = new FormData(submitForm);
      const labels = {};
      for (const pair of list(f.get("labels") || "")) {
        const at = pair.indexOf("=");
        if (at <= 0) {
          flash("Labels must be key=value, separated by commas", true);
          return;
        }
        labels[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
      }
      const body = {
        title: f.get("title") || "",
        description: f.get("description") || "",
        capabilities: list(f.get("capabilities") || ""),
        priority: parseInt(f.get("priority") || "0", 10) || 0,
        labels: labels,
      };
      const repo = (f.get("repo") || "").trim();
      if (repo) body.repo = repo;
      try {
        const res = await post(submitForm.getAttribute("data-post"), body);
        if (res.ok) {
          const task = await res.json();
          flash("Submitted task " + task.id, false);
          submitForm.reset();
        } else {
          flash("Submit refused: " + (await errorText(res)), true);
        }
      } catch (e) {
        flash("The hub could not be reached: " + e, true);
      }
      scheduleRefresh();
    });
  }

  // === A task's live log ===

  const log = document.getElementById("log");
  const logStatus = document.getElementById("log-status");
  let logSource = null;
  let logEnded = false;
  // Most characters kept in the panel; older text is dropped from the top.
  const LOG_CHARS_MAX = 200000;

  function logSay(text) {
    if (logStatus) logStatus.textContent = text;
  }

  function openLog() {
    if (!log || logSource || logEnded) return;
    // A reopened stream starts again from its tail.
    log.textContent = "";
    logSource = new EventSource(log.getAttribute("data-log-url"));
    // A reconnect starts again from the tail too: drop what was shown.
    logSource.onopen = () => {
      log.textContent = "";
      logSay("following");
    };
    logSource.addEventListener("chunk", (e) => {
      let text = "";
      try {
        text = JSON.parse(e.data).text || "";
      } catch (err) {
        return;
      }
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.appendChild(document.createTextNode(text));
      if (log.textContent.length > LOG_CHARS_MAX) {
        log.textContent = log.textContent.slice(-LOG_CHARS_MAX);
      }
      if (atBottom) log.scrollTop = log.scrollHeight;
    });
    logSource.addEventListener("end", () => {
      logEnded = true;
      logSay("ended");
      closeLog();
    });
    logSource.addEventListener("error", (e) => {
      if (e && e.data) {
        let message = "the log is not available";
        try {
          message = JSON.parse(e.data).error.message || message;
        } catch (err) {
          // Keep the general message.
        }
        logEnded = true;
        logSay(message);
        closeLog();
      } else if (logSource && logSource.readyState === EventSource.CLOSED) {
        logEnded = true;
        logSay("the log is not available");
        logSource = null;
      } else {
        logSay("reconnecting…");
      }
    });
  }

  function closeLog() {
    if (logSource) {
      logSource.close();
      logSource = null;
    }
  }

  open();
  openLog();
  freshenTimes();
})();
