// smtpproxy web: small progressive enhancements; every page works without it.
// No inline script anywhere (the Content-Security-Policy forbids it): this
// file finds its elements by id.
"use strict";

// The filter form: empty fields stay out of the URL, so a shared link holds
// only the filters that are set.
function tidyFilters() {
  const form = document.getElementById("filters");
  if (!form) return;
  form.addEventListener("submit", () => {
    for (const input of form.querySelectorAll("input")) {
      if (input.value === "") input.disabled = true;
    }
  });
  // back to the page (bfcache): the fields must be usable again
  window.addEventListener("pageshow", () => {
    for (const input of form.querySelectorAll("input")) input.disabled = false;
  });
}

// record --web: the server says when a session opens or closes (server-sent
// events); the list is fetched again for this page's own URL (its filters,
// sort and page) and put in place. Rows that were not there are marked.
function followLive() {
  const list = document.getElementById("list");
  if (!list || !list.dataset.live || !window.EventSource) return;
  const badge = document.getElementById("live");
  let busy = false;
  let again = false;

  async function load() {
    const before = new Set(
      Array.from(list.querySelectorAll("tr[data-session]"), (tr) => tr.dataset.session),
    );
    const answer = await fetch("/rows" + window.location.search, {
      credentials: "same-origin",
      headers: { accept: "text/html" },
    });
    if (!answer.ok) return;
    // parsed, not run: DOMParser never executes scripts, and the server
    // escaped everything that came from a recording
    const doc = new DOMParser().parseFromString(await answer.text(), "text/html");
    for (const tr of doc.querySelectorAll("tr[data-session]")) {
      if (!before.has(tr.dataset.session)) tr.classList.add("fresh");
    }
    list.replaceChildren(...Array.from(doc.body.childNodes));
  }

  async function refresh() {
    if (busy) {
      again = true; // one more fetch after this one, however many events came
      return;
    }
    busy = true;
    try {
      do {
        again = false;
        await load();
      } while (again);
    } catch (err) {
      // the server stopped or the network failed: the next event tries again
    } finally {
      busy = false;
    }
  }

  const source = new EventSource(list.dataset.live);
  let opened = false;
  source.addEventListener("session", refresh);
  source.addEventListener("open", () => {
    if (badge) badge.hidden = false;
    if (opened) refresh(); // connected again: what happened meanwhile
    opened = true;
  });
  source.addEventListener("error", () => {
    if (badge) badge.hidden = true;
  });
}

tidyFilters();
followLive();
