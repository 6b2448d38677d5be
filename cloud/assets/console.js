// The console's one script (an ES module; the CSP allows no inline script). It holds
// this browser's developer key (WebCrypto Ed25519, non-extractable, in IndexedDB),
// builds and signs commands after showing them decoded from the exact bytes to sign,
// verifies device-signed results against the device key, and runs the live parts
// (SSE). Everything from devices or chutes is written with textContent, never HTML.
import * as codec from "./codec.js";

const $ = (s, el = document) => el.querySelector(s);
const $$ = (s, el = document) => Array.from(el.querySelectorAll(s));
const csrf = () => $('meta[name="csrf-token"]')?.content ?? "";
const say = (msg, el = $("#status")) => {
  if (el) el.textContent = msg;
};
const TERMINAL = ["succeeded", "failed", "refused", "expired"];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": csrf() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const v = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(v.error || `${method} ${path}: HTTP ${r.status}`);
  return v;
}

// ---------- this browser's key ----------

function idb() {
  return new Promise((resolve, reject) => {
    const q = indexedDB.open("chute-console", 1);
    q.onupgradeneeded = () => q.result.createObjectStore("keys");
    q.onsuccess = () => resolve(q.result);
    q.onerror = () => reject(q.error);
  });
}

async function idbDo(mode, f) {
  const db = await idb();
  return new Promise((resolve, reject) => {
    const tx = db.transaction("keys", mode);
    const q = f(tx.objectStore("keys"));
    tx.oncomplete = () => resolve(q.result);
    tx.onerror = () => reject(tx.error);
  });
}

let keyPromise = null;
/// The developer key of this browser: created once, private half never extractable.
export function myKey() {
  keyPromise ??= (async () => {
    let k = await idbDo("readonly", (s) => s.get("developer"));
    if (!k) {
      const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
      k = { privateKey: pair.privateKey, publicKey };
      await idbDo("readwrite", (s) => s.put(k, "developer"));
    }
    return k;
  })();
  return keyPromise;
}

async function myGrants() {
  const k = await myKey();
  const list = await api("GET", `/api/v1/grants?developer=${codec.hex(k.publicKey)}`);
  return list.map((g) => ({ row: g, signed: codec.decodeSignedGrant(codec.unhex(g.signed)) }));
}

/// The newest valid grant for this key, as chutectl picks it.
async function myGrant() {
  const now = Date.now() / 1000;
  const valid = (await myGrants()).filter((g) => g.row.revoked_at === null && g.row.expires_at > now);
  if (!valid.length) throw new Error("this browser's key holds no valid grant: see Keys for the line the fleet owner runs");
  valid.sort((a, b) => b.row.issued_at - a.row.issued_at);
  return valid[0].signed;
}

let lastRequest = 0n;
function requestId() {
  let r = BigInt(Date.now()) * 1000n;
  if (r <= lastRequest) r = lastRequest + 1n;
  lastRequest = r;
  return r;
}

/// Asks the person to confirm what will be signed; resolves true or false.
function confirmSign(lines) {
  const d = $("#confirm");
  const ul = $("#confirm-what");
  ul.replaceChildren(
    ...lines.map((l) => {
      const li = document.createElement("li");
      li.textContent = l;
      return li;
    }),
  );
  return new Promise((resolve) => {
    const done = (v) => {
      d.close();
      $("#confirm-yes").onclick = null;
      $("#confirm-no").onclick = null;
      resolve(v);
    };
    $("#confirm-yes").onclick = () => done(true);
    $("#confirm-no").onclick = () => done(false);
    d.showModal();
  });
}

/// Builds, shows (decoded from the bytes to sign), signs and submits one command per
/// target. Returns [{device, command (decoded), id}] or null if the person cancelled.
async function signAndSend(targets, args, deployment = null) {
  const k = await myKey();
  const grant = await myGrant();
  const digest = await codec.grantDigest(grant.grant);
  const now = BigInt(Math.floor(Date.now() / 1000));
  const prepared = targets.map((device) => {
    const bytes = codec.commandCanonical({
      device_id: codec.unhex(device),
      request_id: requestId(),
      issued_at: now,
      expires_at: now + 300n,
      args,
      grant_digest: digest,
    });
    // What is shown and sent is decoded from the exact bytes the key signs.
    const command = codec.decodeCommand(bytes.slice(codec.COMMAND_TAG.length));
    return { device, bytes, command };
  });
  if (!(await confirmSign(prepared.map((p) => codec.describe(p.command))))) return null;
  const sent = [];
  for (const p of prepared) {
    const signature = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, k.privateKey, p.bytes));
    const frame = codec.encodeCall(0, { command: p.command, signer: k.publicKey, signature, grant });
    const v = await api("POST", `/api/v1/devices/${p.device}/commands`, { command: codec.hex(frame), deployment });
    sent.push({ device: p.device, command: p.command, id: v.id, view: v });
  }
  return sent;
}

/// Verifies a RESULT frame (hex) for a decoded command against the device key (hex).
async function verified(resultHex, pubkeyHex, command) {
  try {
    const o = await codec.verifyResult(codec.unhex(resultHex), codec.unhex(pubkeyHex), command);
    if (o.ok) {
      const text = new TextDecoder().decode(o.payload);
      let value = text;
      try {
        value = JSON.parse(text);
      } catch {
        /* not JSON: keep the text */
      }
      return { ok: true, text: "verified (device-signed)", value };
    }
    return { ok: true, text: `verified (device-signed error ${o.code}: ${o.message})` };
  } catch (e) {
    return { ok: false, text: `NOT verified: ${e.message}` };
  }
}

/// Waits for a command's outcome and verifies it in this browser.
async function outcome(sent) {
  for (let i = 0; i < 600; i++) {
    const v = await api("GET", `/api/v1/commands/${sent.id}`);
    if (TERMINAL.includes(v.status)) {
      if (!v.result) return { status: v.status, text: v.reason || "no device result" };
      const d = await api("GET", `/api/v1/devices/${sent.device}`);
      const r = await verified(v.result, d.pubkey, sent.command);
      return { status: v.status, text: r.text, value: r.value };
    }
    await sleep(500);
  }
  return { status: "unknown", text: "no outcome after 5 minutes" };
}

// ---------- pages ----------

function devicePage() {
  const table = $("#chutes");
  const device = table.dataset.device;
  for (const b of $$("button.sign", table)) {
    b.addEventListener("click", async () => {
      const args = { procedure: b.dataset.procedure, chute: b.dataset.chute };
      if (args.procedure === "stop") args.timeout_secs = 10;
      const out = $("#outcome");
      try {
        say(`${args.procedure} ${args.chute}: signing…`, out);
        const sent = await signAndSend([device], args);
        if (!sent) return say(`${args.procedure} ${args.chute}: cancelled`, out);
        say(`${args.procedure} ${args.chute}: sent, waiting for the device…`, out);
        const o = await outcome(sent[0]);
        say(`${args.procedure} ${args.chute}: ${o.status}, ${o.text}`, out);
      } catch (e) {
        say(`${args.procedure} ${args.chute}: ${e.message}`, out);
      }
    });
  }
  const es = new EventSource(`/console/events/device/${device}`);
  es.addEventListener("device", (ev) => {
    const v = JSON.parse(ev.data);
    const age = $("#heartbeat-age");
    if (age && v.heartbeat_age_secs !== null) age.textContent = `${v.heartbeat_age_secs} s ago`;
    for (const c of v.chutes) {
      const row = $$("tr[data-chute]", table).find((r) => r.dataset.chute === c.name);
      if (!row) continue;
      $(".state", row).textContent = c.state ?? "?";
      $(".restarts", row).textContent = c.restarts ?? "?";
    }
  });
}

function logsPage() {
  const box = $("#logs");
  const { device, chute } = box.dataset;
  const list = $("#log-lines");
  const state = $("#log-state");
  const pause = $("#pause");
  let paused = false;
  let held = [];
  let es = null;
  let after = 0;
  const show = (l) => {
    const li = document.createElement("li");
    li.className = l.stream === "stderr" ? "stderr" : "stdout";
    li.textContent = l.text;
    list.append(li);
    while (list.children.length > 2000) list.firstElementChild.remove();
    li.scrollIntoView({ block: "nearest" });
  };
  const open = () => {
    es?.close();
    es = new EventSource(`/console/events/logs/${device}/${chute}?after=${after}`);
    es.addEventListener("lines", (ev) => {
      const v = JSON.parse(ev.data);
      for (const l of v.lines) {
        after = Math.max(after, l.seq);
        if (paused) held.push(l);
        else show(l);
      }
      if (paused) say(`Paused (${held.length} lines held).`, state);
    });
    es.addEventListener("waiting", () => {
      if (!list.children.length) say("Waiting for the device to start sending lines…", state);
    });
  };
  $("#follow").addEventListener("click", async () => {
    try {
      say("Signing the logs command…", state);
      const sent = await signAndSend([device], { procedure: "logs", chute, tail: 20, follow: true });
      if (!sent) return say("Cancelled.", state);
      open();
      const o = await outcome(sent[0]);
      if (o.status !== "succeeded") return say(`logs: ${o.status}, ${o.text}`, state);
      // The tail came back in the device-signed result: shown first, marked verified
      // (live lines after it are relayed by the cloud, unsigned).
      const tail = (o.value?.lines ?? []).map((l) => {
        const li = document.createElement("li");
        li.className = `verified ${l.stream === "stderr" ? "stderr" : "stdout"}`;
        li.title = "in the device-signed result (verified)";
        li.textContent = l.line ?? l.text ?? "";
        return li;
      });
      list.prepend(...tail);
      say(`Following: ${tail.length} tail line(s) ${o.text}; newer lines relayed by the cloud (not signed).`, state);
    } catch (e) {
      say(e.message, state);
    }
  });
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    pause.setAttribute("aria-pressed", String(paused));
    if (!paused) {
      held.forEach(show);
      held = [];
      say("Following.", state);
    } else {
      say("Paused.", state);
    }
  });
}

function commandsPage() {
  for (const td of $$("td.verify")) {
    // What was signed, from the signed bytes (the other columns are the server's word).
    const cell = td.previousElementSibling;
    try {
      const sc = codec.decodeCall(codec.unhex(td.dataset.command)).command;
      cell.textContent = `${codec.describe(sc.command)}; signed by ${codec.hex(sc.signer).slice(0, 16)}…`;
    } catch (e) {
      cell.textContent = `does not decode: ${e.message}`;
      cell.classList.add("bad");
    }
    if (!td.dataset.result) continue;
    (async () => {
      try {
        const call = codec.decodeCall(codec.unhex(td.dataset.command));
        const r = await verified(td.dataset.result, td.dataset.pubkey, call.command.command);
        td.textContent = r.text;
        td.classList.add(r.ok ? "ok" : "bad");
      } catch (e) {
        td.textContent = `NOT verified: ${e.message}`;
        td.classList.add("bad");
      }
    })();
  }
}

async function keysPage() {
  const k = await myKey();
  const pub = codec.hex(k.publicKey);
  $("#my-pubkey").textContent = pub;
  const input = $("#grant-chutes");
  const line = () => {
    $("#grant-line").textContent =
      `chutectl grant issue --to ${pub} --procedures deploy,start,stop,restart,remove,logs,status --chutes ${input.value.trim() || "hello-*"}`;
  };
  input.addEventListener("input", line);
  line();
  const body = $("#grants tbody");
  const now = Date.now() / 1000;
  const rows = [];
  for (const g of await myGrants()) {
    const gr = g.signed.grant;
    const tr = document.createElement("tr");
    const state = g.row.revoked_at !== null ? "revoked" : g.row.expires_at <= now ? "expired" : "valid";
    for (const v of [
      String(g.row.id),
      codec.rightsNames(gr.rights).join(", "),
      gr.chute_patterns.join(", "),
      gr.devices.length ? gr.devices.map(codec.hex).join(", ") : "every device",
      new Date(Number(gr.expires_at) * 1000).toISOString(),
      state,
    ]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  if (!rows.length) say("No grants for this browser's key yet.");
}

function deployPage() {
  let manifest = null;
  const check = $("#manifest-check");
  $("#manifest-file").addEventListener("change", async (ev) => {
    manifest = null;
    const f = ev.target.files[0];
    if (!f) return;
    const text = await f.text();
    const r = await fetch("/console/validate", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "text/plain", "x-csrf-token": csrf() },
      body: text,
    });
    const v = await r.json().catch(() => ({ ok: false, error: `HTTP ${r.status}` }));
    if (v.ok) {
      manifest = { text, ...v };
      const bw = [v.bandwidth_down && `down ${v.bandwidth_down}`, v.bandwidth_up && `up ${v.bandwidth_up}`].filter(Boolean).join(", ");
      say(`chute.toml is valid: ${v.name} ${v.version}, image ${v.image}, CPU ${v.cpu}, memory ${v.memory}, pids ${v.pids}${bw ? `, bandwidth ${bw}` : ""}`, check);
    } else {
      say(`chute.toml is refused: ${v.error}`, check);
    }
  });
  const bar = $("#upload-progress");
  const barText = $("#upload-text");
  const progress = (done, total) => {
    const pct = total ? Math.floor((done / total) * 100) : 100;
    bar.value = pct;
    bar.textContent = `${pct}%`;
    barText.textContent = `${pct}% (${done} of ${total} bytes)`;
  };
  const put = (sha, offset, size, chunk, onProgress) =>
    new Promise((resolve, reject) => {
      const x = new XMLHttpRequest();
      x.open("PUT", `/api/v1/blobs/${sha}?offset=${offset}&size=${size}`);
      x.setRequestHeader("x-csrf-token", csrf());
      x.setRequestHeader("content-type", "application/octet-stream");
      x.upload.onprogress = (e) => onProgress(e.loaded);
      x.onload = () => {
        let v = {};
        try {
          v = JSON.parse(x.responseText);
        } catch {
          /* keep {} */
        }
        if (x.status === 200) resolve(v);
        else reject(new Error(v.error || `upload: HTTP ${x.status}`));
      };
      x.onerror = () => reject(new Error("upload: network error"));
      x.send(chunk);
    });
  $("#deploy-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      if (!manifest) throw new Error("pick a valid chute.toml first");
      const targets = new Set($$('input[name="device"]:checked').map((c) => c.value));
      const tag = $("#deploy-tag").value.trim();
      if (tag) {
        for (const d of await api("GET", `/api/v1/devices?tag=${encodeURIComponent(tag)}&status=accepted`)) targets.add(d.id);
      }
      if (!targets.size) throw new Error("choose at least one device or a tag with accepted devices");
      let image = null;
      const file = $("#image-file").files[0];
      if (file) {
        say("Hashing the image archive…");
        const sha = codec.hex(await codec.sha256(new Uint8Array(await file.arrayBuffer())));
        let offset = 0;
        const have = await fetch(`/api/v1/blobs/${sha}`, { credentials: "same-origin" });
        if (have.ok) offset = (await have.json()).received;
        const CHUNK = 1 << 20;
        progress(offset, file.size);
        while (offset < file.size) {
          const chunk = file.slice(offset, Math.min(offset + CHUNK, file.size));
          const st = await put(sha, offset, file.size, chunk, (n) => progress(offset + n, file.size));
          offset = st.received;
          progress(offset, file.size);
          if (st.complete) break;
        }
        image = { sha, size: file.size };
      } else {
        progress(0, 0);
      }
      const dep = await api("POST", "/api/v1/deployments", {
        chute: manifest.name,
        version: manifest.version,
        image_sha256: image ? image.sha : null,
        devices: [...targets],
      });
      const args = {
        procedure: "deploy",
        chute: manifest.name,
        manifest_toml: manifest.text,
        image_sha256: image ? codec.unhex(image.sha) : null,
        image_size: BigInt(image ? image.size : 0),
      };
      const sent = await signAndSend([...targets], args, dep.id);
      if (!sent) return say(`deployment ${dep.id}: cancelled before signing`);
      say(`deployment ${dep.id}: sent to ${sent.length} device(s); waiting for outcomes…`);
      watchDeployment(dep.id, sent);
    } catch (e) {
      say(`Deploy: ${e.message}`);
    }
  });
}

function watchDeployment(id, sent) {
  const body = $("#outcomes tbody");
  const es = new EventSource(`/console/events/deployment/${id}`);
  const checked = new Map();
  es.addEventListener("outcomes", async (ev) => {
    const rows = [];
    for (const o of JSON.parse(ev.data)) {
      let v = checked.get(o.device_id);
      if (!v && o.result && o.pubkey) {
        const mine = sent.find((s) => s.device === o.device_id);
        const command = mine ? mine.command : codec.decodeCall(codec.unhex(o.signed)).command.command;
        v = (await verified(o.result, o.pubkey, command)).text;
        checked.set(o.device_id, v);
      }
      const tr = document.createElement("tr");
      tr.dataset.device = o.device_id;
      for (const t of [o.device_id, o.status, v ?? (o.result ? "checking…" : "no result yet"), o.reason ?? ""]) {
        const td = document.createElement("td");
        td.textContent = t;
        tr.append(td);
      }
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  });
  es.addEventListener("done", () => {
    es.close();
    say(`deployment ${id}: every device answered`);
  });
}

const pages = { chutes: devicePage, logs: logsPage, commands: commandsPage, "grant-line": keysPage, "deploy-form": deployPage };
for (const [id, f] of Object.entries(pages)) {
  if (document.getElementById(id)) {
    Promise.resolve()
      .then(f)
      .catch((e) => say(e.message));
  }
}
