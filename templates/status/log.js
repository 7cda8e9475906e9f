"use strict";
// Refreshes the log tail (and the state badge) of an app page from the JSON API every two
// seconds. Text only ever goes in through textContent, so log lines cannot become markup.
(function () {
  var log = document.getElementById("log");
  if (!log) { return; }
  var url = log.getAttribute("data-src");
  var state = document.getElementById("state");
  var note = document.getElementById("log-updated");
  var polls = 0;
  function refresh() {
    fetch(url, { cache: "no-store", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (d) {
        var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
        log.textContent = d.lines.length ? d.lines.join("\n") : "(no output yet)";
        if (atEnd) { log.scrollTop = log.scrollHeight; }
        if (state && d.state) {
          state.textContent = d.state;
          state.className = "state " + d.state;
        }
        polls += 1;
        log.setAttribute("data-polls", String(polls));
        if (note) { note.textContent = "live, updated " + new Date().toLocaleTimeString(); }
      })
      .catch(function (e) {
        if (note) { note.textContent = "keter is not answering (" + e.message + "); retrying"; }
      })
      .then(function () { setTimeout(refresh, 2000); });
  }
  log.scrollTop = log.scrollHeight;
  refresh();
})();
