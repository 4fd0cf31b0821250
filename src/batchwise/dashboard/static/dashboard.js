// batchwise dashboard: every few seconds, fetch the figures and their panels as JSON and
// redraw each panel in place (no page reload). The panels are rendered by batchwise itself
// (reports/sections.py), the same ones `savings --html` writes, so both pages always agree.
(function () {
  "use strict";
  var panels = document.getElementById("panels");
  var status = document.getElementById("status");
  var every = Number(panels && panels.dataset.refreshMs) || 5000;
  var refreshes = 0;

  function show(text, stale) {
    status.textContent = text;
    status.className = stale ? "meta stale" : "meta";
  }

  function redraw(page) {
    Object.keys(page.sections).forEach(function (name) {
      var body = document.getElementById(name + "-body");
      if (body) body.innerHTML = page.sections[name];
    });
    refreshes += 1;
    panels.dataset.generatedAt = page.data.generated_at;
    panels.dataset.refreshes = String(refreshes);
    show("updated " + page.data.generated_at.slice(0, 19).replace("T", " ") +
         " UTC · refreshes every " + every / 1000 + " s", false);
  }

  function tick() {
    fetch("api/sections", { cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(redraw)
      .catch(function (err) {
        show("cannot reach batchwise (" + err.message + "); trying again", true);
      })
      .then(function () { setTimeout(tick, every); });
  }

  if (panels) setTimeout(tick, every);
})();
