// smtpproxy web, the session page: a click on an arrow or box of the
// diagram shows its whole text under it (the SVG's tooltips need a
// hover). Text goes in through textContent only. The page works without it.
"use strict";
(function () {
  const svg = document.getElementById("diagram");
  const detail = document.getElementById("arrow-detail");
  if (!svg || !detail) return;
  let selected = null;
  svg.addEventListener("click", function (event) {
    const item = event.target.closest(".arrow, .marker");
    if (!item || event.target.closest("a")) return;
    if (selected) selected.classList.remove("selected");
    if (selected === item) {
      selected = null;
      detail.hidden = true;
      return;
    }
    selected = item;
    item.classList.add("selected");
    const title = item.querySelector("title");
    detail.textContent = (item.dataset.t ? Number(item.dataset.t).toFixed(3) + " s  " : "") +
      (title ? title.textContent : "");
    detail.hidden = false;
  });
  // a masked AUTH value's link opens its <details> (the click reveals it)
  function openTarget() {
    const id = decodeURIComponent(location.hash.slice(1));
    const box = id && document.getElementById(id);
    if (box && box.classList.contains("auth-attempt")) {
      box.querySelectorAll("details.secret").forEach(function (d) { d.open = true; });
    }
  }
  window.addEventListener("hashchange", openTarget);
})();
