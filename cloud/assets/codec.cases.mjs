// The browser codec's test cases against the Rust golden fixtures (proto/tests/golden),
// runnable in Node (codec.test.mjs) and in Chromium (tests/console/console_test.py runs
// them in the browser the console targets). `golden(name)` returns a fixture's bytes.
import * as c from "./codec.js";

// A small assert with the node:assert names used here, so the cases need no Node.
function fail(msg) {
  throw new Error(msg);
}
const same = (a, b) => {
  if (a instanceof Uint8Array || b instanceof Uint8Array) {
    return a instanceof Uint8Array && b instanceof Uint8Array && a.length === b.length && a.every((x, i) => x === b[i]);
  }
  if (Array.isArray(a) || Array.isArray(b)) {
    return Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((x, i) => same(x, b[i]));
  }
  if (a && b && typeof a === "object" && typeof b === "object") {
    const ka = Object.keys(a).sort();
    const kb = Object.keys(b).sort();
    return same(ka, kb) && ka.every((k) => same(a[k], b[k]));
  }
  return a === b;
};
const show = (v) => String(v instanceof Uint8Array ? c.hex(v) : typeof v === "object" ? JSON.stringify(v, (k, x) => (typeof x === "bigint" ? `${x}n` : x)) : v);
export const assert = {
  equal: (a, b, m) => a === b || fail(m ?? `${show(a)} !== ${show(b)}`),
  deepEqual: (a, b, m) => same(a, b) || fail(m ?? `${show(a)} differs from ${show(b)}`),
  ok: (v, m) => v || fail(m ?? "not ok"),
  match: (s, re, m) => re.test(s) || fail(m ?? `${s} does not match ${re}`),
  throws: (f, re) => {
    try {
      f();
    } catch (e) {
      return re.test(e.message) || fail(`threw ${e.message}, expected ${re}`);
    }
    fail(`did not throw ${re}`);
  },
  rejects: async (p, re) => {
    try {
      await p;
    } catch (e) {
      return re.test(e.message) || fail(`rejected with ${e.message}, expected ${re}`);
    }
    fail(`did not reject ${re}`);
  },
};

export const FIXTURES = ["call", "command_canonical", "grant_canonical", "command_signature", "grant_signature",
  "device_pubkey", "device_id", "result_ok", "result_err", "v1/call"];

/// [name, async () => {}] pairs; `golden(name)` gives a fresh copy of a fixture's bytes.
export function cases(golden) {
  return [
  ["a CALL frame decodes and re-encodes byte for byte", () => {
    const bytes = golden("call");
    const call = c.decodeCall(bytes);
    assert.equal(call.request, 9n);
    assert.equal(call.command.command.args.procedure, "deploy");
    assert.equal(call.command.command.args.chute, "hello-web");
    assert.equal(call.command.command.request_id, 42n);
    assert.deepEqual(c.encodeCall(call.request, call.command), bytes);
  }],

  ["command and grant canonical bytes match the fixtures", async () => {
    const sc = c.decodeCall(golden("call")).command;
    assert.deepEqual(c.commandCanonical(sc.command), golden("command_canonical"));
    assert.deepEqual(c.grantCanonical(sc.grant.grant), golden("grant_canonical"));
    assert.deepEqual(sc.signature, golden("command_signature"));
    assert.deepEqual(sc.grant.signature, golden("grant_signature"));
    // The command is bound to its grant by digest, and the developer key signed it.
    assert.deepEqual(sc.command.grant_digest, await c.grantDigest(sc.grant.grant));
    assert.ok(await c.verifyEd25519(sc.signer, c.commandCanonical(sc.command), sc.signature));
    assert.deepEqual(c.rightsNames(sc.grant.grant.rights), ["deploy", "start", "logs"]);
    assert.deepEqual(sc.grant.grant.chute_patterns, ["hello-*"]);
  }],

  ["a command decoded from its canonical body describes what is signed", () => {
    const sc = c.decodeCall(golden("call")).command;
    const body = golden("command_canonical").slice(c.COMMAND_TAG.length);
    const d = c.decodeCommand(body);
    assert.deepEqual(d, sc.command);
    assert.match(c.describe(d), /^deploy, chute hello-web, image sha256 abab/);
  }],

  ["every argument shape round-trips", () => {
    const base = c.decodeCall(golden("call")).command.command;
    const shapes = [
      { procedure: "start", chute: "a-web" },
      { procedure: "stop", chute: "a-web", timeout_secs: 10 },
      { procedure: "restart", chute: "a-web" },
      { procedure: "remove", chute: "b-web" },
      { procedure: "logs", chute: "a-web", tail: 100, follow: true },
      { procedure: "inspect", chute: "a-web" },
      { procedure: "status" },
      { procedure: "deploy", chute: "a-web", manifest_toml: "name = \"a-web\"\n", image_sha256: null, image_size: 0n },
    ];
    for (const args of shapes) {
      const cmd = { ...base, args };
      const back = c.decodeCommand(c.encodeCommand(cmd));
      assert.deepEqual(back.args, args, args.procedure);
    }
  }],

  ["device-signed results verify, and a tampered one does not", async () => {
    const sc = c.decodeCall(golden("call")).command;
    const device = golden("device_pubkey");
    assert.deepEqual(await c.deviceIdOf(device), golden("device_id"));
    const ok = await c.verifyResult(golden("result_ok"), device, sc.command);
    assert.equal(ok.ok, true);
    assert.equal(new TextDecoder().decode(ok.payload), "deployed");
    const err = await c.verifyResult(golden("result_err"), device, sc.command);
    assert.equal(err.ok, false);
    assert.match(err.message, /MiB/);
    const bad = golden("result_ok");
    bad[bad.length - 70] ^= 1; // inside the payload
    await assert.rejects(c.verifyResult(bad, device, sc.command), /NOT signed|payload|truncated/);
    const other = { ...sc.command, request_id: 43n };
    await assert.rejects(c.verifyResult(golden("result_ok"), device, other), /another request/);
    await assert.rejects(c.verifyResult(golden("result_ok"), sc.signer, sc.command), /does not hash/);
  }],

  ["frames of other versions or types and trailing bytes are refused", () => {
    const v1 = golden("v1/call");
    assert.throws(() => c.decodeCall(v1), /protocol version 1/);
    assert.throws(() => c.decodeCall(golden("result_ok")), /frame type 50/);
    assert.throws(() => c.decodeCall(c.concat(golden("call"), Uint8Array.of(0))), /trailing/);
    assert.throws(() => c.decodeCall(golden("call").slice(0, 40)), /truncated/);
  }],

  ["names the device would refuse are refused before signing", () => {
    const base = c.decodeCall(golden("call")).command.command;
    for (const chute of ["", "A-web", "-web", "web-", "x".repeat(41), "a web"]) {
      assert.throws(() => c.encodeCommand({ ...base, args: { procedure: "stop", chute } }), /chute/);
    }
  }],
  ];
}

/// Runs every case; returns [{name, ok, error}].
export async function runAll(golden) {
  const out = [];
  for (const [name, f] of cases(golden)) {
    try {
      await f();
      out.push({ name, ok: true });
    } catch (e) {
      out.push({ name, ok: false, error: String(e.message) });
    }
  }
  return out;
}
