// New held jobs appear on the Approvals page without a reload: every 2 s the list is fetched and
// cards are added or removed one by one, so a reason being typed into another card is kept.
"use strict";
(function () {
  const section = document.querySelector("[data-poll]");
  if (!section) return;
  const url = section.getAttribute("data-poll");
  async function refresh() {
    let text;
    try {
      const answer = await fetch(url, { credentials: "same-origin", headers: { accept: "text/html" } });
      if (!answer.ok || answer.redirected) return;
      text = await answer.text();
    } catch (e) {
      return;
    }
    const fresh = new DOMParser().parseFromString(text, "text/html").body;
    const wanted = new Map([...fresh.querySelectorAll("article[data-job]")].map((a) => [a.dataset.job, a]));
    const shown = new Map([...section.querySelectorAll("article[data-job]")].map((a) => [a.dataset.job, a]));
    for (const [id, card] of shown) if (!wanted.has(id)) card.remove();
    for (const [id, card] of wanted) if (!shown.has(id)) section.appendChild(document.adoptNode(card));
    const empty = section.querySelector("p.empty");
    if (wanted.size && empty) empty.remove();
    if (!wanted.size && !empty) section.replaceChildren(...fresh.childNodes);
  }
  setInterval(refresh, 2000);
})();
