// The console's only script. A region with data-poll is refreshed from that address until the
// server marks its answer final (X-Poll-Done): an outcome that has arrived, an import processed.
// A region marked data-reload-when-done then reloads its page, whose data the change has changed
// (the page shows the outcome in place). Without JavaScript the page refreshes itself instead (a
// <noscript> refresh in its head).
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
          if (region.hasAttribute("data-reload-when-done")) {
            window.location.reload();
          }
          return;
        }
      }
    } catch (error) {
      // the API is restarting or the network blinked: try again
    }
    if (tries < GIVE_UP_AFTER) {
      setTimeout(tick, POLL_EVERY_MS);
    } else {
      region.removeAttribute("data-poll");
      region.insertAdjacentHTML("beforeend", "<p>Stopped looking. Reload the page to look again.</p>");
    }
  };
  setTimeout(tick, POLL_EVERY_MS);
}

document.querySelectorAll("[data-poll]").forEach(poll);

// A time's tooltip says the exact moment in UTC (from the server); add the viewer's own time zone.
document.querySelectorAll("time[datetime][title]").forEach((element) => {
  const moment = new Date(element.getAttribute("datetime"));
  if (!Number.isNaN(moment.getTime())) {
    element.title = `${moment.toLocaleString()} your time (${element.title})`;
  }
});
