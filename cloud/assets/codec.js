// The command encoding (postcard, protocol v2) in the browser: enough to build the exact
// bytes a developer key signs, to decode a command before signing it (so the page shows
// what is signed, not what the server says), and to verify a device-signed result.
// It mirrors proto/src/command.rs and proto/src/message.rs; codec.test.mjs checks it
// byte for byte against the Rust golden fixtures in proto/tests/golden/.
// It is not a general postcard library: only the types above, with the same caps.

export const VERSION = 2;
export const CALL = 48;
export const RESULT = 50;
const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });
export const COMMAND_TAG = enc.encode("chute.v2 command\0");
export const GRANT_TAG = enc.encode("chute.v2 grant\0");
export const RESULT_TAG = enc.encode("chute.v1 result\0");

export const PROCEDURES = ["", "deploy", "start", "stop", "restart", "remove", "logs", "inspect", "status", "update-grant"];
const MAX_CHUTE_NAME = 40;
const MAX_MANIFEST = 64 * 1024;
const MAX_TEXT = 1024;
const MAX_PAYLOAD = 512 * 1024;
const MAX_GRANT_PATTERNS = 16;
const MAX_GRANT_DEVICES = 1024;

export class CodecError extends Error {}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function unhex(s) {
  if (typeof s !== "string" || s.length % 2 !== 0 || /[^0-9a-fA-F]/.test(s)) {
    throw new CodecError("not hex");
  }
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let i = 0;
  for (const p of parts) {
    out.set(p, i);
    i += p.length;
  }
  return out;
}

class Writer {
  constructor() {
    this.parts = [];
  }
  raw(bytes) {
    this.parts.push(Uint8Array.from(bytes));
  }
  u8(n) {
    this.parts.push(Uint8Array.of(n));
  }
  varint(n) {
    let v = BigInt(n);
    if (v < 0n) throw new CodecError("negative integer");
    const out = [];
    do {
      let b = Number(v & 0x7fn);
      v >>= 7n;
      if (v > 0n) b |= 0x80;
      out.push(b);
    } while (v > 0n);
    this.parts.push(Uint8Array.from(out));
  }
  bytes(b) {
    this.varint(b.length);
    this.raw(b);
  }
  str(s) {
    this.bytes(enc.encode(s));
  }
  fixed(b, n, what) {
    if (b.length !== n) throw new CodecError(`${what}: ${n} bytes expected`);
    this.raw(b);
  }
  done() {
    return concat(...this.parts);
  }
}

class Reader {
  constructor(bytes) {
    this.b = bytes;
    this.i = 0;
  }
  take(n, what) {
    if (this.i + n > this.b.length) throw new CodecError(`${what}: truncated`);
    const out = this.b.slice(this.i, this.i + n);
    this.i += n;
    return out;
  }
  u8(what) {
    return this.take(1, what)[0];
  }
  varint(what, bits = 64) {
    let v = 0n;
    let shift = 0n;
    for (;;) {
      const b = this.u8(what);
      v |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) break;
      shift += 7n;
      if (shift >= BigInt(bits + 7)) throw new CodecError(`${what}: varint too long`);
    }
    if (v >> BigInt(bits) !== 0n) throw new CodecError(`${what}: out of range`);
    return v;
  }
  len(what, max) {
    const n = this.varint(what, 32);
    if (n > BigInt(max)) throw new CodecError(`${what}: ${n} is longer than ${max}`);
    return Number(n);
  }
  bytes(what, max) {
    return this.take(this.len(what, max), what);
  }
  str(what, max) {
    try {
      return dec.decode(this.bytes(what, max));
    } catch (e) {
      if (e instanceof CodecError) throw e;
      throw new CodecError(`${what}: not UTF-8`);
    }
  }
  bool(what) {
    const b = this.u8(what);
    if (b > 1) throw new CodecError(`${what}: not a bool`);
    return b === 1;
  }
  end(what) {
    if (this.i !== this.b.length) throw new CodecError(`${what}: ${this.b.length - this.i} trailing bytes`);
  }
}

const NAME_RE = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/;

function chuteName(s, what = "chute") {
  if (s.length < 1 || s.length > MAX_CHUTE_NAME || !NAME_RE.test(s)) {
    throw new CodecError(`${what} ${JSON.stringify(s)}: 1..=40 of a-z 0-9 -, not starting or ending with -`);
  }
  return s;
}

// ---------- grants ----------

function readGrant(r) {
  const developer = r.take(32, "developer");
  const rights = Number(r.varint("rights", 32));
  const np = r.len("chute_patterns", MAX_GRANT_PATTERNS);
  const chute_patterns = [];
  for (let i = 0; i < np; i++) chute_patterns.push(r.str("chute pattern", MAX_CHUTE_NAME));
  const nd = r.len("devices", MAX_GRANT_DEVICES);
  const devices = [];
  for (let i = 0; i < nd; i++) devices.push(r.take(8, "device"));
  const issued_at = r.varint("issued_at");
  const expires_at = r.varint("expires_at");
  return { developer, rights, chute_patterns, devices, issued_at, expires_at };
}

function writeGrant(w, g) {
  w.fixed(g.developer, 32, "developer");
  w.varint(g.rights);
  w.varint(g.chute_patterns.length);
  for (const p of g.chute_patterns) w.str(p);
  w.varint(g.devices.length);
  for (const d of g.devices) w.fixed(d, 8, "device");
  w.varint(g.issued_at);
  w.varint(g.expires_at);
}

function readSignedGrant(r) {
  return { grant: readGrant(r), signature: r.take(64, "grant signature") };
}

function writeSignedGrant(w, g) {
  writeGrant(w, g.grant);
  w.fixed(g.signature, 64, "grant signature");
}

export function encodeGrant(g) {
  const w = new Writer();
  writeGrant(w, g);
  return w.done();
}

export function decodeSignedGrant(bytes) {
  const r = new Reader(bytes);
  const g = readSignedGrant(r);
  r.end("grant");
  return g;
}

export function grantCanonical(g) {
  return concat(GRANT_TAG, encodeGrant(g));
}

export function rightsNames(bits) {
  return PROCEDURES.filter((p, i) => p && bits & (1 << i));
}

// ---------- commands ----------

function readArgs(r) {
  const code = r.u8("procedure");
  const procedure = PROCEDURES[code];
  if (!procedure) throw new CodecError(`procedure: unknown code ${code}`);
  const a = { procedure };
  switch (procedure) {
    case "deploy":
      a.chute = chuteName(r.str("chute", MAX_CHUTE_NAME));
      a.manifest_toml = r.str("manifest", MAX_MANIFEST);
      a.image_sha256 = r.bool("image option") ? r.take(32, "image sha256") : null;
      a.image_size = r.varint("image_size");
      break;
    case "start":
    case "restart":
    case "remove":
    case "inspect":
      a.chute = chuteName(r.str("chute", MAX_CHUTE_NAME));
      break;
    case "stop":
      a.chute = chuteName(r.str("chute", MAX_CHUTE_NAME));
      a.timeout_secs = Number(r.varint("timeout_secs", 32));
      break;
    case "logs":
      a.chute = chuteName(r.str("chute", MAX_CHUTE_NAME));
      a.tail = Number(r.varint("tail", 32));
      a.follow = r.bool("follow");
      break;
    case "status":
      break;
    case "update-grant":
      a.grant = readSignedGrant(r);
      break;
  }
  return a;
}

function writeArgs(w, a) {
  const code = PROCEDURES.indexOf(a.procedure);
  if (code < 1) throw new CodecError(`procedure ${a.procedure}: unknown`);
  w.u8(code);
  switch (a.procedure) {
    case "deploy":
      w.str(chuteName(a.chute));
      if (enc.encode(a.manifest_toml).length > MAX_MANIFEST) throw new CodecError("manifest: too long");
      w.str(a.manifest_toml);
      if (a.image_sha256) {
        w.u8(1);
        w.fixed(a.image_sha256, 32, "image sha256");
      } else {
        w.u8(0);
      }
      w.varint(a.image_size ?? 0);
      break;
    case "start":
    case "restart":
    case "remove":
    case "inspect":
      w.str(chuteName(a.chute));
      break;
    case "stop":
      w.str(chuteName(a.chute));
      w.varint(a.timeout_secs ?? 10);
      break;
    case "logs":
      w.str(chuteName(a.chute));
      w.varint(a.tail ?? 100);
      w.u8(a.follow ? 1 : 0);
      break;
    case "status":
      break;
    case "update-grant":
      writeSignedGrant(w, a.grant);
      break;
  }
}

function readCommand(r) {
  const device_id = r.take(8, "device_id");
  const request_id = r.varint("request_id");
  const issued_at = r.varint("issued_at");
  const expires_at = r.varint("expires_at");
  const args = readArgs(r);
  const grant_digest = r.take(32, "grant_digest");
  return { device_id, request_id, issued_at, expires_at, args, grant_digest };
}

function writeCommand(w, c) {
  w.fixed(c.device_id, 8, "device_id");
  w.varint(c.request_id);
  w.varint(c.issued_at);
  w.varint(c.expires_at);
  writeArgs(w, c.args);
  w.fixed(c.grant_digest, 32, "grant_digest");
}

export function encodeCommand(c) {
  const w = new Writer();
  writeCommand(w, c);
  return w.done();
}

export function decodeCommand(bytes) {
  const r = new Reader(bytes);
  const c = readCommand(r);
  r.end("command");
  return c;
}

export function commandCanonical(c) {
  return concat(COMMAND_TAG, encodeCommand(c));
}

/// A CALL frame (version, type, request, SignedCommand): how a signed command travels.
export function encodeCall(request, sc) {
  const w = new Writer();
  w.u8(VERSION);
  w.u8(CALL);
  w.varint(request);
  writeCommand(w, sc.command);
  w.fixed(sc.signer, 32, "signer");
  w.fixed(sc.signature, 64, "signature");
  writeSignedGrant(w, sc.grant);
  return w.done();
}

function frame(bytes, type, what) {
  const r = new Reader(bytes);
  const v = r.u8(what);
  if (v !== VERSION) throw new CodecError(`${what}: protocol version ${v}, this page speaks ${VERSION}`);
  const t = r.u8(what);
  if (t !== type) throw new CodecError(`${what}: frame type ${t}, expected ${type}`);
  return r;
}

export function decodeCall(bytes) {
  const r = frame(bytes, CALL, "CALL frame");
  const request = r.varint("request");
  const command = readCommand(r);
  const signer = r.take(32, "signer");
  const signature = r.take(64, "signature");
  const grant = readSignedGrant(r);
  r.end("CALL frame");
  return { request, command: { command, signer, signature, grant } };
}

// ---------- results ----------

function readOutcome(r) {
  const v = r.varint("outcome", 32);
  if (v === 0n) return { ok: true, payload: r.bytes("payload", MAX_PAYLOAD) };
  if (v === 1n) {
    const code = Number(r.varint("error code", 16));
    return { ok: false, code, message: r.str("message", MAX_TEXT) };
  }
  throw new CodecError(`outcome: unknown variant ${v}`);
}

function writeOutcome(w, o) {
  if (o.ok) {
    w.varint(0);
    w.bytes(o.payload);
  } else {
    w.varint(1);
    w.varint(o.code);
    w.str(o.message);
  }
}

export function decodeResult(bytes) {
  const r = frame(bytes, RESULT, "RESULT frame");
  const request = r.varint("request");
  const result = {
    request_id: r.varint("request_id"),
    device_id: r.take(8, "device_id"),
    command_digest: r.take(32, "command_digest"),
    outcome: readOutcome(r),
    signature: r.take(64, "result signature"),
  };
  r.end("RESULT frame");
  return { request, result };
}

export function resultCanonical(res) {
  const w = new Writer();
  w.raw(RESULT_TAG);
  w.varint(res.request_id);
  w.fixed(res.device_id, 8, "device_id");
  w.fixed(res.command_digest, 32, "command_digest");
  writeOutcome(w, res.outcome);
  return w.done();
}

// ---------- crypto (WebCrypto: the browser's and Node's) ----------

function eq(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

export async function deviceIdOf(pubkey) {
  return (await sha256(pubkey)).slice(0, 8);
}

export async function grantDigest(g) {
  return sha256(grantCanonical(g));
}

export async function verifyEd25519(pubkey, message, signature) {
  const key = await crypto.subtle.importKey("raw", pubkey, { name: "Ed25519" }, false, ["verify"]);
  return crypto.subtle.verify({ name: "Ed25519" }, key, signature, message);
}

/// Verifies a RESULT frame against the device key and the command it answers, as
/// chutectl does: the key must hash to the addressed device id, and the result must
/// be signed by it for exactly this command. Returns {ok, outcome} or throws why not.
export async function verifyResult(resultBytes, devicePubkey, command) {
  const want = await deviceIdOf(devicePubkey);
  if (!eq(want, command.device_id)) throw new CodecError("the device key does not hash to the addressed device id");
  const { result } = decodeResult(resultBytes);
  if (!eq(result.device_id, want)) throw new CodecError("the result names another device");
  if (result.request_id !== command.request_id) throw new CodecError("the result answers another request");
  if (!eq(result.command_digest, await sha256(commandCanonical(command)))) {
    throw new CodecError("the result answers a different command");
  }
  if (!(await verifyEd25519(devicePubkey, resultCanonical(result), result.signature))) {
    throw new CodecError("the result is NOT signed by the device key");
  }
  return result.outcome;
}

/// One line a person can check before signing: what, on which chute and device, until when.
export function describe(c) {
  const a = c.args;
  const parts = [a.procedure];
  if (a.chute) parts.push(`chute ${a.chute}`);
  if (a.procedure === "deploy") {
    parts.push(a.image_sha256 ? `image sha256 ${hex(a.image_sha256)} (${a.image_size} bytes)` : "image already on the device");
  }
  if (a.procedure === "stop") parts.push(`timeout ${a.timeout_secs}s`);
  if (a.procedure === "logs") parts.push(`tail ${a.tail}${a.follow ? ", follow" : ""}`);
  if (a.procedure === "update-grant") parts.push(`grant for ${hex(a.grant.grant.developer)}`);
  parts.push(`on device ${hex(c.device_id)}`);
  parts.push(`request ${c.request_id}`);
  parts.push(`expires ${new Date(Number(c.expires_at) * 1000).toISOString()}`);
  return parts.join(", ");
}
