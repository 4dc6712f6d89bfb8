// muster dashboard: live updates from the hub's event stream (SSE), with a
// Live / Reconnecting / Stale badge, polling as a fallback, and no stream
// while the tab is hidden. Sent as a file of its own so the page's
// Content-Security-Policy allows no inline script.
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

  let source = null;
  let refreshTimer = null;
  let lastEvent = Date.now();

  function setBadge(state, text) {
    badge.className = "badge " + state;
    badge.textContent = text;
  }

  // Re-renders the page's live regions from the server: the same HTML a
  // reload would give, swapped in place.
  async function refresh() {
    refreshTimer = null;
    try {
      const res = await fetch(location.href, { headers: { "X-Muster-Fragment": "1" } });
      if (res.status === 401 || res.redirected) {
        location.href = "/login";
        return;
      }
      if (!res.ok) return;
      const doc = new DOMParser().parseFromString(await res.text(), "text/html");
      for (const el of document.querySelectorAll("[data-live]")) {
        const fresh = doc.getElementById(el.id);
        if (fresh) el.replaceWith(fresh);
      }
    } catch (e) {
      setBadge("stale", "Stale");
    }
  }

  function scheduleRefresh() {
    if (refreshTimer === null) refreshTimer = setTimeout(refresh, 150);
  }

  function open() {
    if (source) return;
    source = new EventSource("/api/v1/events");
    source.onopen = () => setBadge("live", "Live");
    source.onmessage = () => {
      lastEvent = Date.now();
      scheduleRefresh();
    };
    source.onerror = () => setBadge("reconnecting", "Reconnecting");
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
      setBadge("stale", "Paused");
    } else {
      open();
      scheduleRefresh();
    }
  });

  // Fallback: while the stream is down, poll.
  setInterval(() => {
    if (document.hidden) return;
    if (!source || source.readyState !== EventSource.OPEN) {
      setBadge("stale", "Stale");
      scheduleRefresh();
    }
  }, 5000);

  open();
})();
