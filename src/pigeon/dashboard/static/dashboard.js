// The pigeon dashboard page: polls /api/snapshot and draws it. Every value
// from the system is set as text (never as HTML): queue and service names
// come from peers.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "pigeon-dashboard-token";
const QUEUE_FIELDS = ["ready", "in_flight", "consumers", "received_rate", "acked_rate", "dead"];
const SERVICE_FIELDS = ["servers", "calls", "errors", "p50_ms", "p99_ms"];
const queueRows = new Map();
let interval = 1000;

function $(id) { return document.getElementById(id); }

function show(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(1);
  return String(value);
}

function cell(row, text, field) {
  const td = document.createElement("td");
  if (field) td.dataset.field = field;
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function sparkline(values) {
  const width = 120, height = 24;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.classList.add("sparkline");
  const numbers = values.filter((v) => typeof v === "number");
  const top = Math.max(1, ...numbers);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  let points = [];
  const flush = () => {
    if (points.length > 0) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.join(" "));
      svg.appendChild(line);
    }
    points = [];
  };
  values.forEach((v, i) => {
    if (typeof v !== "number") { flush(); return; }  // a gap: no reading
    const y = height - 1 - (v / top) * (height - 2);
    points.push(`${(i * step).toFixed(1)},${y.toFixed(1)}`);
  });
  flush();
  const title = document.createElementNS(SVG, "title");
  title.textContent = numbers.length ? `now ${show(values[values.length - 1])}, max ${show(top)}` : "no readings yet";
  svg.appendChild(title);
  return svg;
}

function button(label, action, queue) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.queue = queue;
  b.addEventListener("click", () => act(action, queue));
  return b;
}

function queueRow(name) {
  const tr = document.createElement("tr");
  tr.dataset.queue = name;
  if (name.endsWith(".dead")) tr.classList.add("dead-queue");
  cell(tr, name).classList.add("name");
  for (const field of QUEUE_FIELDS) cell(tr, "", field);
  cell(tr, "", "spark-ready").classList.add("spark");
  cell(tr, "", "spark-received").classList.add("spark");
  const actions = cell(tr, "", "actions");
  if (!name.endsWith(".dead")) {
    actions.append(button("show", "show", name), button("replay", "replay", name),
      button("purge", "purge", name));
  }
  return tr;
}

function drawQueues(snapshot) {
  const body = $("queues").tBodies[0];
  const names = Object.keys(snapshot.queues).sort();
  for (const [name, tr] of queueRows) {
    if (!(name in snapshot.queues)) { tr.remove(); queueRows.delete(name); }
  }
  names.forEach((name, i) => {
    let tr = queueRows.get(name);
    if (!tr) { tr = queueRow(name); queueRows.set(name, tr); }
    if (body.rows[i] !== tr) body.insertBefore(tr, body.rows[i] || null);
    const row = snapshot.queues[name];
    for (const field of QUEUE_FIELDS) {
      const value = row[field];
      const text = field.endsWith("_rate") && typeof value === "number" ? value.toFixed(1) : show(value);
      tr.querySelector(`[data-field="${field}"]`).textContent = text;
    }
    const history = snapshot.history[name];
    for (const [field, series] of [["spark-ready", "ready"], ["spark-received", "received_rate"]]) {
      const td = tr.querySelector(`[data-field="${field}"]`);
      td.replaceChildren(history ? sparkline(history[series]) : document.createTextNode("—"));
    }
    for (const b of tr.querySelectorAll('button[data-action="replay"], button[data-action="purge"]')) {
      b.disabled = !row.dead;
    }
  });
  $("queue-count").textContent = `(${names.length})`;
  const untracked = $("untracked");
  untracked.hidden = !snapshot.untracked;
  untracked.textContent = `${snapshot.untracked} queue(s) shown without a history (the dashboard follows at most ${Object.keys(snapshot.history).length})`;
}

function drawTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows);
}

function drawServices(snapshot) {
  // pigeon.* are the node's own admin services (the dashboard's readings
  // among their calls): counted, not listed.
  const names = Object.keys(snapshot.services).sort();
  const shown = names.filter((name) => !name.startsWith("pigeon."));
  $("admin-services").textContent = shown.length < names.length
    ? `(and ${names.length - shown.length} pigeon.* admin services)` : "";
  drawTable("services", shown.map((name) => {
    const tr = document.createElement("tr");
    tr.dataset.service = name;
    cell(tr, name).classList.add("name");
    for (const field of SERVICE_FIELDS) cell(tr, show(snapshot.services[name][field]), field);
    return tr;
  }));
}

function drawPeers(snapshot) {
  drawTable("peers", snapshot.peers.map((peer) => {
    const tr = document.createElement("tr");
    cell(tr, show(peer.address)).classList.add("name");
    cell(tr, show(peer.node), "node");
    cell(tr, peer.up === null || peer.up === undefined ? "—" : (peer.up ? "up" : "down"), "up");
    cell(tr, (peer.services || []).join(", "), "services");
    return tr;
  }));
}

function draw(snapshot) {
  $("address").textContent = snapshot.url;
  const status = $("status");
  const banner = $("error");
  if (snapshot.error) {
    status.textContent = snapshot.error.kind;
    status.className = "status bad";
    banner.hidden = false;
    const age = snapshot.updated ? ` (numbers below are from ${Math.round(snapshot.now - snapshot.updated)} s ago)` : "";
    banner.textContent = `${snapshot.error.kind}: ${snapshot.error.message}${age}`;
  } else {
    status.textContent = "live";
    status.className = "status good";
    banner.hidden = true;
  }
  $("updated").textContent = snapshot.updated ? `read ${new Date(snapshot.updated * 1000).toLocaleTimeString()}` : "no reading yet";
  drawQueues(snapshot);
  drawServices(snapshot);
  drawPeers(snapshot);
  document.body.dataset.ready = snapshot.updated ? "yes" : "no";
  document.body.dataset.polls = String(snapshot.watcher.polls);
}

async function refresh() {
  try {
    const answer = await fetch("/api/snapshot", { cache: "no-store" });
    if (!answer.ok) throw new Error(`the dashboard answered ${answer.status}`);
    const snapshot = await answer.json();
    interval = Math.max(500, snapshot.interval * 1000);
    draw(snapshot);
  } catch (error) {
    const banner = $("error");
    banner.hidden = false;
    banner.textContent = `The dashboard does not answer: ${error.message}`;
    $("status").textContent = "offline";
    $("status").className = "status bad";
  }
  setTimeout(refresh, interval);
}

function say(text, bad) {
  const line = $("action");
  line.textContent = text;
  line.className = bad ? "bad" : "good";
}

async function showLetters(queue) {
  const answer = await fetch(`/api/dead?queue=${encodeURIComponent(queue)}&limit=20`, { cache: "no-store" });
  const value = await answer.json();
  if (!answer.ok) { say(`dead letters of ${queue}: ${value.error.kind || ""} ${value.error.message || value.error}`, true); return; }
  $("letters").hidden = false;
  $("letters-queue").textContent = queue;
  $("letters").querySelector("tbody").replaceChildren(...value.map((letter) => {
    const tr = document.createElement("tr");
    cell(tr, show(letter.id)).classList.add("name");
    cell(tr, show(letter.attempts));
    cell(tr, show(letter.reason)).classList.add("text");
    cell(tr, show(letter.body)).classList.add("body");
    return tr;
  }));
}

async function act(action, queue) {
  if (action === "show") { await showLetters(queue); return; }
  const token = $("token").value.trim();
  if (!token) { say("Paste the token pigeon dashboard printed to replay or purge.", true); return; }
  if (action === "purge" && !window.confirm(`Delete every dead letter of ${queue}?`)) return;
  const answer = await fetch(`/api/${action}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Pigeon-Token": token },
    body: JSON.stringify({ queue }),
  });
  const value = await answer.json();
  if (!answer.ok) {
    const error = value.error;
    say(`${action} ${queue} refused: ${typeof error === "string" ? error : `${error.kind}: ${error.message}`}`, true);
    return;
  }
  say(action === "replay" ? `replayed ${value.replayed} dead letter(s) into ${queue}`
    : `purged ${value.purged} dead letter(s) of ${queue}`, false);
}

function keepToken() {
  // The start line gives the token in the fragment, which the browser never
  // sends to a server; keep it for this tab only, and take it out of the bar.
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, "", location.pathname);
  }
  const input = $("token");
  input.value = sessionStorage.getItem(TOKEN_KEY) || "";
  input.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, input.value.trim()));
}

keepToken();
refresh();
