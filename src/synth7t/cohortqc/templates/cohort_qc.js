// Sorting by a column header and the "flagged only" filter; no libraries, works from file://.
(function () {
  var table = document.getElementById("qc");
  var body = table.tBodies[0];
  var shown = document.getElementById("shown");
  var filter = document.getElementById("flagged-only");

  function count() {
    var total = body.rows.length;
    var visible = filter.checked ? body.querySelectorAll("tr.flagged").length : total;
    shown.textContent = "showing " + visible + " of " + total;
  }

  function sortBy(th) {
    var col = th.cellIndex;
    var numeric = th.dataset.type === "num";
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    var keyed = Array.prototype.map.call(body.rows, function (row) {
      var v = row.cells[col].dataset.v;
      return { row: row, empty: v === "", key: numeric ? parseFloat(v) : (v || "").toLowerCase() };
    });
    keyed.sort(function (a, b) {
      if (a.empty !== b.empty) { return a.empty ? 1 : -1; }  // empty cells last, either way
      if (a.key < b.key) { return -dir; }
      if (a.key > b.key) { return dir; }
      return 0;
    });
    var next = body.cloneNode(false);  // fill a detached body, then swap: one layout, not one per row
    table.removeChild(body);
    keyed.forEach(function (k) { next.appendChild(k.row); });
    table.appendChild(next);
    body = next;
    table.querySelectorAll("th[aria-sort]").forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  }

  table.querySelectorAll("th[data-type]").forEach(function (th) {
    th.querySelector("button").addEventListener("click", function () { sortBy(th); });
  });
  filter.addEventListener("change", function () {
    table.classList.toggle("flagged-only", filter.checked);
    count();
  });
  count();
})();
