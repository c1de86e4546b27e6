// The console's only script. A region with data-poll is refreshed from that address until the
// server marks its answer final (X-Poll-Done): an outcome that has arrived, an import processed.
// Without JavaScript the page refreshes itself instead (a <noscript> refresh in its head).
"use strict";

const POLL_EVERY_MS = 500;
const GIVE_UP_AFTER = 240; // two minutes

function poll(region) {
  let tries = 0;
  const tick = async () => {
    tries += 1;
    try {
      const response = await fetch(region.dataset.poll, { credentials: "same-origin" });
      if (response.ok) {
        region.innerHTML = await response.text();
        if (response.headers.get("X-Poll-Done")) {
          region.removeAttribute("data-poll");
          return;
        }
      }
    } catch (error) {
      // the API is restarting or the network blinked: try again
    }
    if (tries < GIVE_UP_AFTER) {
      setTimeout(tick, POLL_EVERY_MS);
    } else {
      region.insertAdjacentHTML("beforeend", "<p>Still waiting. Reload the page to keep waiting.</p>");
    }
  };
  setTimeout(tick, POLL_EVERY_MS);
}

document.querySelectorAll("[data-poll]").forEach(poll);
