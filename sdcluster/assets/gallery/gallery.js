// Filter the cards of a gallery page by one slot value. Plain JS, no network: the page opens from file://.
// The choice lives in the URL's fragment (#slot=name=value), so the page links carry it from page to page.
"use strict";

function currentFilter() {
  const match = /^#slot=(.*)$/.exec(window.location.hash);
  return match ? decodeURIComponent(match[1]) : "";
}

function applyFilter(choice) {
  const [name, ...rest] = choice ? choice.split("=") : [""];
  const value = rest.join("=");
  let shown = 0;
  const cards = document.querySelectorAll(".card");
  cards.forEach((card) => {
    const slots = JSON.parse(card.dataset.slots || "{}");
    const visible = !choice || (Object.prototype.hasOwnProperty.call(slots, name) && String(slots[name]) === value);
    card.classList.toggle("hidden", !visible);
    if (visible) shown += 1;
  });
  // a group heading whose cards are all hidden is hidden too
  document.querySelectorAll("section.group").forEach((section) => {
    section.classList.toggle("hidden", !section.querySelector(".card:not(.hidden)"));
  });
  const counter = document.getElementById("shown");
  if (counter) counter.textContent = `${shown} of ${cards.length} shown`;
  const hash = choice ? `#slot=${encodeURIComponent(choice)}` : "";
  document.querySelectorAll("a.page").forEach((link) => {
    link.href = link.getAttribute("href").split("#")[0] + hash;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("slot-filter");
  const choice = currentFilter();
  if (select) {
    select.value = choice;
    select.addEventListener("change", () => {
      history.replaceState(null, "", select.value ? `#slot=${encodeURIComponent(select.value)}` : "#");
      applyFilter(select.value);
    });
  }
  applyFilter(select ? select.value : "");
});
