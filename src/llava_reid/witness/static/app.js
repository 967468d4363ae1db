// The witness page: a thin client of the server's dialogue sessions (JSON over fetch).
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let state = null;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({error: `HTTP ${res.status}`}));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function setBusy(busy) {
  $("busy").hidden = !busy;
  document.body.dataset.busy = busy ? "1" : "0";
  for (const b of document.querySelectorAll("button, input, textarea, select")) {
    if (!b.classList.contains("tab")) b.disabled = busy;
  }
}

async function act(call) {
  $("error").textContent = "";
  setBusy(true);
  try {
    state = await call();
    render();
  } catch (err) {
    $("error").textContent = err.message;
  } finally {
    setBusy(false);
  }
}

function render() {
  const s = state;
  $("session").hidden = false;
  const beyond = s.round >= s.rounds ? " · going on past the configured rounds" : "";
  $("round").textContent = `Round ${s.round} of ${s.rounds}${beyond}`;
  $("round").dataset.round = s.round;
  $("query").textContent = s.query;
  const rank = $("target-rank");
  rank.hidden = s.target_rank === null;
  rank.textContent = s.target_rank === null ? "" : `Target rank ${s.target_rank}`;
  rank.dataset.rank = s.target_rank ?? "";

  $("ask").hidden = s.finished;
  $("question").textContent = s.question || "(no question this round: answer anything you remember)";
  const done = $("done");
  done.hidden = !s.finished;
  if (s.finished) {
    let text = s.picked === null ? "Session ended without a pick."
      : `You picked image ${s.picked}` + (s.picked_correct === true ? " — the target."
        : s.picked_correct === false ? " — not the target." : ".");
    if (s.target_rank !== null) text += ` Final target rank: ${s.target_rank}.`;
    done.replaceChildren(el("b", {textContent: "Done. "}), text,
      el("div", {class: "muted small", textContent: s.saved_to ? `Saved to ${s.saved_to}` : ""}));
  }

  const box = $("target-box");
  box.hidden = s.mode !== "replay";
  if (s.mode === "replay") $("target-img").src = `/image/${s.query_id}`;

  const cands = new Set(s.candidates);
  $("ranking").replaceChildren(...s.ranking.map((r) => {
    const classes = ["thumb"];
    if (r.candidate) classes.push("candidate");
    if (s.mode === "replay" && r.pid === s.target_pid) classes.push("is-target");
    if (s.picked === r.image_idx) classes.push("picked");
    const head = el("div", {class: "head"}, el("span", {class: "rank", textContent: `#${r.rank}`}));
    if (cands.has(r.image_idx)) head.append(el("span", {class: "tag cand", textContent: "asked", title: "shown to the questioner"}));
    if (s.mode === "replay" && r.pid === s.target_pid) head.append(el("span", {class: "tag tgt", textContent: "target"}));
    const card = el("figure", {class: classes.join(" "),
      dataset: {rank: r.rank, imageIdx: r.image_idx, candidate: r.candidate ? "1" : "0"}},
      head,
      el("img", {src: `/image/${r.image_idx}`, alt: `image ${r.image_idx}`, loading: "lazy"}),
      el("div", {class: "meta"}, el("div", {textContent: `score ${r.score.toFixed(3)}`}),
        el("div", {textContent: `id ${r.pid}`})));
    if (!s.finished) {
      card.append(el("button", {type: "button", textContent: "That's them",
        onclick: () => act(() => api(`/api/sessions/${s.session_id}/finish`, {image_idx: r.image_idx}))}));
    }
    return card;
  }));

  const rows = s.history.filter((h) => h.question || h.answer);
  $("history").tBodies[0].replaceChildren(...s.history.map((h) => el("tr", {},
    el("td", {textContent: h.round}),
    el("td", {textContent: h.question}),
    el("td", {textContent: h.answer}),
    el("td", {class: "num", textContent: h.target_rank ?? "–"}))));
  $("history").dataset.answered = rows.filter((h) => h.answer).length;

  const sim = s.simulated || [];
  $("simulated-box").hidden = sim.length === 0;
  $("simulated").tBodies[0].replaceChildren(...sim.map((h) => el("tr", {},
    el("td", {textContent: h.round}), el("td", {textContent: h.question}),
    el("td", {textContent: h.answer}), el("td", {class: "num", textContent: h.target_rank}))));
  if (!s.finished) $("answer-input").focus();
}

function showTab(replay) {
  $("tab-free").classList.toggle("active", !replay);
  $("tab-replay").classList.toggle("active", replay);
  $("free-form").hidden = replay;
  $("replay-form").hidden = !replay;
}

async function init() {
  try {
    info = await api("/api/info");
  } catch (err) {
    $("error").textContent = err.message;
    return;
  }
  $("run-info").textContent = `${info.label} · ${info.gallery} gallery images · ` +
    `${info.rounds} rounds · ${info.device} · ${info.run}`;
  const select = $("query-select");
  select.replaceChildren(...info.queries.map((q) =>
    el("option", {value: q.query_id, textContent: `${q.query_id}: ${q.initial.slice(0, 60)}`})));
  const preview = () => {
    const q = info.queries.find((x) => String(x.query_id) === select.value);
    $("query-preview").textContent = q ? q.initial : "";
  };
  select.addEventListener("change", preview);
  preview();

  $("tab-free").addEventListener("click", () => showTab(false));
  $("tab-replay").addEventListener("click", () => showTab(true));
  $("free-form").addEventListener("submit", (e) => {
    e.preventDefault();
    act(() => api("/api/sessions", {description: $("description").value}));
  });
  $("replay-form").addEventListener("submit", (e) => {
    e.preventDefault();
    act(() => api("/api/sessions", {query_id: Number(select.value)}));
  });
  const answer = (text) => act(async () => {
    const next = await api(`/api/sessions/${state.session_id}/answer`, {answer: text});
    $("answer-input").value = "";
    return next;
  });
  $("answer-form").addEventListener("submit", (e) => {
    e.preventDefault();
    answer($("answer-input").value);
  });
  $("idk-btn").addEventListener("click", () => answer("I don't know"));
  $("stop-btn").addEventListener("click", () =>
    act(() => api(`/api/sessions/${state.session_id}/finish`, {})));
}

document.addEventListener("DOMContentLoaded", init);
