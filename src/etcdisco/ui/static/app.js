// The etcdisco dashboard: plain JavaScript, no build step, nothing from elsewhere.
// The server pushes what changes (server-sent events from its discover_all() cache);
// this script refetches only the rows on screen, one request at a time, and asks for
// the leases' time left of those rows only.
"use strict";

(function () {
  const PAGE = 100;
  const MAX_SERVICES_SHOWN = 300;
  const admin = document.body.dataset.admin === "true";
  const view = { service: "", q: "", status: "", offset: 0 };
  let services = [];
  let servicesDrawn = "";
  let rows = [];
  let total = 0;
  let leases = {}; // hex id -> {ttl, granted, at (ms), error}
  let inFlight = false;
  let dirty = false;
  let leaseTimer = null;
  let feedUp = null; // null: not connected yet
  let cacheState = { state: "connecting" };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else if (k === "title") node.title = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function clock(seconds) {
    const d = new Date(seconds * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function stamp(seconds) {
    const d = new Date(seconds * 1000);
    const today = new Date();
    return d.toDateString() === today.toDateString() ? clock(seconds) : d.toLocaleString([], { hour12: false });
  }

  function duration(seconds) {
    let left = Math.max(0, Math.floor(seconds));
    const parts = [];
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
      if (left >= size || (unit === "s" && parts.length === 0)) {
        parts.push(Math.floor(left / size) + unit);
        left %= size;
      }
      if (parts.length === 2) break;
    }
    return parts.join("");
  }

  function metaText(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // -- fetching ------------------------------------------------------------------

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }

  function query() {
    const params = new URLSearchParams();
    if (view.service) params.set("service", view.service);
    if (view.q) params.set("q", view.q);
    if (view.status) params.set("status", view.status);
    params.set("offset", String(view.offset));
    params.set("limit", String(PAGE));
    return params.toString();
  }

  // One refresh at a time; changes arriving meanwhile make one more, not one each.
  async function refresh() {
    if (inFlight) {
      dirty = true;
      return;
    }
    inFlight = true;
    try {
      do {
        dirty = false;
        const [svc, page] = await Promise.all([getJSON("api/services"), getJSON("api/instances?" + query())]);
        services = svc.services;
        rows = page.rows;
        total = page.total;
        if (rows.length === 0 && total > 0 && view.offset > 0) {
          view.offset = Math.max(0, Math.floor((total - 1) / PAGE) * PAGE);
          dirty = true;
          continue;
        }
        showState(svc);
        // The list of services is redrawn only when it changed (counts included).
        const signature = JSON.stringify(services);
        if (signature !== servicesDrawn) {
          servicesDrawn = signature;
          renderServices();
        }
        renderRows();
        document.body.dataset.revision = String(page.revision);
        document.body.dataset.renderedAt = String(Date.now());
        if (!document.body.dataset.firstRenderedAt) document.body.dataset.firstRenderedAt = document.body.dataset.renderedAt;
        fetchLeases();
      } while (dirty);
    } catch (err) {
      showNotice("could not load: " + err.message, true);
    } finally {
      inFlight = false;
    }
  }

  async function fetchLeases() {
    const ids = [...new Set(rows.map((r) => r.lease).filter((l) => l))];
    if (ids.length === 0) return;
    try {
      const answer = await getJSON("api/leases?ids=" + ids.join(","));
      const now = Date.now();
      for (const [id, info] of Object.entries(answer.leases)) {
        leases[id] = { ...info, at: now };
      }
      tickLeases();
    } catch (err) {
      // The next refresh tries again; the cells keep what they had.
    }
  }

  async function loadEvents() {
    const url = "api/events" + (view.service ? "?service=" + encodeURIComponent(view.service) : "");
    try {
      const answer = await getJSON(url);
      const list = $("events");
      list.replaceChildren();
      for (const ev of answer.events) addEvent(ev);
    } catch (err) {
      // shown on the next change
    }
  }

  // -- rendering -----------------------------------------------------------------

  function showState(status) {
    cacheState = status;
    const pill = $("state");
    pill.dataset.state = status.state;
    pill.textContent = status.state === "synced" ? "live" : status.state;
    pill.title = "cache " + status.state + " at revision " + status.revision;
    $("totals").textContent = status.instances + " instances, " + services.length + " services";
    updateBanner();
  }

  function updateBanner() {
    const banner = $("banner");
    let text = "";
    let kind = "";
    if (feedUp === false) {
      text = "The dashboard server is unreachable: showing what it last sent; reconnecting...";
      kind = "down";
    } else if (feedUp === null) {
      text = "Connecting to the dashboard server...";
      kind = "connecting";
    } else if (cacheState.state === "stale") {
      text = "etcd is unreachable: showing the last known state (stale since " + clock(cacheState.since) + ")" +
        (cacheState.error ? ". " + cacheState.error : "");
      kind = "stale";
    } else if (cacheState.state === "connecting") {
      text = "Connecting to etcd...";
      kind = "connecting";
    } else if (cacheState.state === "closed") {
      text = "The dashboard stopped following etcd.";
      kind = "down";
    }
    banner.hidden = !text;
    banner.textContent = text;
    banner.dataset.kind = kind;
    document.body.dataset.state = cacheState.state;
  }

  function countChips(s) {
    const chips = el("span", { class: "counts" });
    for (const word of ["up", "draining", "unhealthy", "disabled", "suspect"]) {
      if (s[word] > 0) chips.append(el("span", { class: "count st-" + word, title: s[word] + " " + word }, s[word] + " " + word));
    }
    return chips;
  }

  function renderServices() {
    const list = $("services");
    const filter = $("service-filter").value.trim().toLowerCase();
    const items = [];
    const all = el("li", { class: "service all" + (view.service === "" ? " selected" : ""), "data-service": "" },
      el("span", { class: "name" }, "All services"));
    items.push(all);
    let shown = 0;
    for (const s of services) {
      if (filter && !s.name.toLowerCase().includes(filter)) continue;
      // Enough to scroll through; the filter box finds the others.
      if (++shown > MAX_SERVICES_SHOWN) {
        items.push(el("li", { class: "more muted" }, "more services: filter to find them"));
        break;
      }
      items.push(el("li", { class: "service" + (view.service === s.name ? " selected" : ""), "data-service": s.name },
        el("span", { class: "name" }, s.name), el("span", { class: "total muted" }, String(s.total)), countChips(s)));
    }
    list.replaceChildren(...items);
  }

  function overrideCell(o) {
    if (!o) return "";
    const parts = [];
    if (o.disabled) parts.push("disabled");
    if (o.weight !== null && o.weight !== undefined) parts.push("weight " + o.weight);
    if (o.service_wide) parts.push("(service)");
    const who = o.by ? " by " + o.by : "";
    const until = o.expires_at ? " until " + stamp(o.expires_at) : "";
    return el("span", { class: "override", title: o.reason || "" },
      el("b", {}, parts.join(" ")), who + until, o.reason ? el("span", { class: "reason" }, ": " + o.reason) : null);
  }

  function metadataCell(md) {
    const keys = Object.keys(md).sort();
    const cell = el("span", { class: "meta", title: keys.map((k) => k + "=" + metaText(md[k])).join("\n") });
    for (const k of keys) {
      if (k === "status" || k === "weight" || k === "zone") continue;
      cell.append(el("span", { class: "kv" }, k + "=" + metaText(md[k])));
    }
    return cell;
  }

  function actionsCell(r) {
    const cell = el("span", { class: "actions" });
    const own = r.override && !r.override.service_wide ? r.override : null;
    if (own && own.disabled) {
      cell.append(el("button", { type: "button", "data-action": "enable" }, "enable"));
    } else {
      cell.append(el("button", { type: "button", "data-action": "disable" }, "disable"));
    }
    cell.append(el("button", { type: "button", "data-action": "weight" }, "weight"));
    cell.append(el("button", { type: "button", "data-action": "deregister", class: "danger" }, "deregister"));
    return cell;
  }

  function renderRows() {
    const body = $("instances").tBodies[0];
    const fresh = rows.map((r) => {
      const tr = el("tr", { "data-key": r.key, "data-service": r.service, "data-id": r.id, "data-status": r.status, class: "st-row-" + r.status },
        el("td", {}, r.service),
        el("td", { class: "id" }, r.id),
        el("td", { class: "addr" }, r.address),
        el("td", { class: "zone" }, r.zone),
        el("td", { class: "num" }, String(r.weight)),
        el("td", {}, el("span", { class: "status st-" + r.status }, r.status)),
        el("td", { class: "health h-" + r.health }, r.health),
        el("td", {}, overrideCell(r.override)),
        el("td", {}, metadataCell(r.metadata)),
        el("td", { class: "lease", "data-lease": r.lease, title: r.lease ? "lease " + r.lease : "no lease" },
          r.lease ? el("code", {}, r.lease.slice(-6)) : "-", el("span", { class: "left" })),
      );
      if (admin) tr.append(el("td", { class: "actions-cell" }, actionsCell(r)));
      return tr;
    });
    body.replaceChildren(...fresh);
    $("empty").hidden = rows.length > 0;
    const first = total === 0 ? 0 : view.offset + 1;
    $("range").textContent = first + "\u2013" + (view.offset + rows.length) + " of " + total;
    $("prev").disabled = view.offset === 0;
    $("next").disabled = view.offset + PAGE >= total;
    $("title").textContent = view.service || "All services";
    tickLeases();
  }

  function tickLeases() {
    const now = Date.now();
    for (const cell of document.querySelectorAll("td.lease")) {
      const info = leases[cell.dataset.lease];
      const left = cell.querySelector(".left");
      if (!info || !left) continue;
      if (info.error) {
        left.textContent = " ?";
        left.title = info.error;
      } else if (info.ttl < 0) {
        left.textContent = " expired";
      } else {
        const seconds = Math.max(0, info.ttl - (now - info.at) / 1000);
        left.textContent = " " + duration(seconds) + " left";
        left.title = "granted " + info.granted + "s";
      }
    }
  }

  function addEvent(ev) {
    if (view.service && ev.service !== view.service) return;
    const list = $("events");
    const item = el("li", { class: "ev ev-" + ev.type, "data-key": ev.key, "data-type": ev.type },
      el("time", {}, clock(ev.at)), " ", el("b", {}, ev.type), " ",
      el("span", { class: "what" }, ev.service + "/" + ev.id), " ", el("span", { class: "muted" }, ev.detail));
    list.prepend(item);
    while (list.children.length > 100) list.lastElementChild.remove();
    $("events-of").textContent = view.service ? "of " + view.service : "of every service";
  }

  let noticeTimer = null;
  function showNotice(text, isError) {
    const notice = $("notice");
    notice.textContent = text;
    notice.hidden = false;
    notice.dataset.kind = isError ? "error" : "ok";
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { notice.hidden = true; }, isError ? 15000 : 6000);
  }

  // -- the live feed -------------------------------------------------------------

  function connect() {
    const source = new EventSource("api/stream");
    source.onopen = () => {
      feedUp = true;
      updateBanner();
      refresh();
      loadEvents();
    };
    source.onerror = () => {
      feedUp = source.readyState === EventSource.OPEN;
      updateBanner();
    };
    source.addEventListener("state", (msg) => {
      const data = JSON.parse(msg.data);
      cacheState = { ...cacheState, ...data };
      showState({ ...data, instances: data.instances });
    });
    source.addEventListener("change", (msg) => {
      const data = JSON.parse(msg.data);
      for (const ev of data.events) addEvent(ev);
      refresh();
    });
    source.addEventListener("resync", () => {
      refresh();
      loadEvents();
    });
  }

  // -- admin actions -------------------------------------------------------------

  const HELP = {
    disable: "Takes the instance out of rotation for every client until enabled (or for the time given). Its own registration is untouched.",
    enable: "Puts the instance back in rotation; a weight override stays.",
    weight: "Replaces the instance's own weight for weighted pickers and xDS.",
    deregister: "Deletes the instance's key (a stale entry). A live instance puts it back within a keepalive round: use disable for a live one.",
  };

  function token() {
    const input = $("token");
    return input ? input.value.trim() : "";
  }

  async function act(action, payload) {
    const headers = { "content-type": "application/json" };
    const t = token();
    if (t) headers["X-Etcdisco-Token"] = t;
    const actor = $("actor") ? $("actor").value.trim() : "";
    if (actor) payload.by = actor;
    const response = await fetch("api/admin/" + action, { method: "POST", headers, body: JSON.stringify(payload), cache: "no-store" });
    let answer = {};
    try {
      answer = await response.json();
    } catch (err) {
      answer = { error: response.statusText };
    }
    if (!response.ok) {
      const refused = response.status === 401 || response.status === 403;
      throw new Error((refused ? "refused: " : "failed: ") + (answer.error || response.status));
    }
    return answer;
  }

  function openAction(action, row) {
    const dialog = $("action-dialog");
    const form = $("action-form");
    form.reset();
    form.dataset.action = action;
    form.dataset.service = row.dataset.service;
    form.dataset.id = row.dataset.id;
    $("action-title").textContent = action + " " + row.dataset.service + "/" + row.dataset.id;
    $("action-help").textContent = HELP[action];
    $("action-error").hidden = true;
    const fields = { disable: ["reason", "for"], weight: ["weight", "reason", "for"], enable: [], deregister: [] }[action];
    for (const label of form.querySelectorAll("label[data-field]")) {
      const on = fields.includes(label.dataset.field);
      label.hidden = !on;
      label.querySelector("input").required = on && (label.dataset.field === "reason" ? action === "disable" : label.dataset.field === "weight");
    }
    dialog.showModal();
    const firstField = form.querySelector("label:not([hidden]) input");
    if (firstField) firstField.focus();
  }

  async function submitAction(event) {
    event.preventDefault();
    const form = $("action-form");
    const action = form.dataset.action;
    const payload = { service: form.dataset.service, id: form.dataset.id };
    const data = new FormData(form);
    if (action === "disable" || action === "weight") {
      if (data.get("reason")) payload.reason = data.get("reason");
      if (data.get("for")) payload.for = data.get("for");
    }
    if (action === "weight") payload.weight = Number(data.get("weight"));
    try {
      const answer = await act(action, payload);
      $("action-dialog").close();
      showNotice(answer.message || action + " done", false);
      refresh();
    } catch (err) {
      const box = $("action-error");
      box.textContent = err.message;
      box.hidden = false;
      showNotice(err.message, true);
    }
  }

  // -- wiring --------------------------------------------------------------------

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  function select(service) {
    view.service = service;
    servicesDrawn = ""; // the selection's highlight moves
    view.offset = 0;
    refresh();
    loadEvents();
  }

  function start() {
    $("services").addEventListener("click", (event) => {
      const item = event.target.closest("li.service");
      if (item) select(item.dataset.service);
    });
    $("service-filter").addEventListener("input", debounce(renderServices, 100));
    $("search").addEventListener("input", debounce(() => {
      view.q = $("search").value.trim();
      view.offset = 0;
      refresh();
    }, 200));
    $("status-filter").addEventListener("change", () => {
      view.status = $("status-filter").value;
      view.offset = 0;
      refresh();
    });
    $("prev").addEventListener("click", () => {
      view.offset = Math.max(0, view.offset - PAGE);
      refresh();
    });
    $("next").addEventListener("click", () => {
      if (view.offset + PAGE < total) view.offset += PAGE;
      refresh();
    });
    if (admin) {
      const input = $("token");
      const saved = sessionStorage.getItem("etcdisco-token");
      if (saved) input.value = saved;
      const actor = localStorage.getItem("etcdisco-actor");
      if (actor) $("actor").value = actor;
      const told = () => {
        sessionStorage.setItem("etcdisco-token", token());
        $("token-state").textContent = token() ? "actions allowed if the token is right" : "read-only until a token is given";
      };
      input.addEventListener("input", told);
      $("actor").addEventListener("input", () => localStorage.setItem("etcdisco-actor", $("actor").value.trim()));
      $("token-form").addEventListener("submit", (event) => event.preventDefault());
      told();
      $("instances").addEventListener("click", (event) => {
        const button = event.target.closest("button[data-action]");
        if (button) openAction(button.dataset.action, button.closest("tr"));
      });
      $("action-form").addEventListener("submit", submitAction);
      $("action-cancel").addEventListener("click", () => $("action-dialog").close());
    }
    leaseTimer = setInterval(tickLeases, 1000);
    // Leases are asked again for the rows on screen every 15 s (the server caches).
    setInterval(fetchLeases, 15000);
    updateBanner();
    // The first rows are fetched at once, not after the live feed opens; the feed's
    // opening fetches again (one more round at most), so that no change made in
    // between is missed.
    refresh();
    loadEvents();
    connect();
  }

  start();
})();
