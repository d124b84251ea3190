// Live updates for the Grid dashboard.
//
// A websocket (/ws/dashboard/) pushes {"type": "node.status", node_id, status}
// whenever a node goes online, offline or draining. Every element marked
// data-node-status="<id>" shows the new status at once, and every live region
// (data-fragment-url) is fetched again from the server, which renders and
// escapes it. Regions with data-refresh-every="<seconds>" are also refreshed
// on a timer while the page is visible.
"use strict";

(function () {
  const STATUSES = new Set(["online", "offline", "draining"]);
  const MAX_RETRY_MS = 15000;
  let retryMs = 1000;
  let refreshTimer = null;

  function setLiveState(state, text) {
    document.body.dataset.live = state;
    const indicator = document.getElementById("live-state");
    if (indicator) {
      indicator.textContent = text;
    }
  }

  async function refreshRegion(region) {
    let response;
    try {
      response = await fetch(region.dataset.fragmentUrl, {
        credentials: "same-origin",
        headers: { "X-Requested-With": "fetch" },
      });
    } catch (error) {
      return; // The gateway is unreachable; the next event or tick tries again.
    }
    // An expired session redirects to the login page, which has no such header.
    if (response.ok && response.headers.get("X-Grid-Fragment") === "1") {
      region.innerHTML = await response.text();
    } else if (response.redirected) {
      setLiveState("off", "Session expired: reload the page to log in");
    }
  }

  function refreshAll() {
    document.querySelectorAll("[data-fragment-url]").forEach(refreshRegion);
  }

  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshAll, 250);
  }

  function showStatus(nodeId, status) {
    let name = null;
    document.querySelectorAll('[data-node-status="' + nodeId + '"]').forEach(function (cell) {
      cell.textContent = status;
      cell.className = "status status-" + status;
      const row = cell.closest("[data-node-name]");
      if (row) {
        name = row.dataset.nodeName;
      }
    });
    if (name !== null) {
      setLiveState("connected", "Live: " + name + " is " + status);
    }
  }

  function onMessage(event) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    if (message.type !== "node.status" || !Number.isInteger(message.node_id) || !STATUSES.has(message.status)) {
      return;
    }
    showStatus(message.node_id, message.status);
    scheduleRefresh();
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + window.location.host + "/ws/dashboard/");
    socket.addEventListener("open", function () {
      retryMs = 1000;
      setLiveState("connected", "Live");
      // Events sent while the socket was closed are lost, so catch up.
      refreshAll();
    });
    socket.addEventListener("message", onMessage);
    socket.addEventListener("close", function () {
      setLiveState("reconnecting", "Live updates lost; reconnecting");
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
    });
  }

  function startTimers() {
    document.querySelectorAll("[data-refresh-every]").forEach(function (region) {
      const seconds = Number(region.dataset.refreshEvery);
      if (seconds > 0) {
        setInterval(function () {
          if (!document.hidden) {
            refreshRegion(region);
          }
        }, seconds * 1000);
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    // The login page has no navigation and no live data.
    if (!document.getElementById("live-state")) {
      return;
    }
    connect();
    startTimers();
  });
})();
