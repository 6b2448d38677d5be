// The browser's command codec against the Rust golden fixtures (proto/tests/golden):
// the same bytes, the same signatures, the same refusals. Run: node --test cloud/assets/
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as c from "./codec.js";

const golden = (name) =>
  c.unhex(readFileSync(new URL(`../../proto/tests/golden/${name}.hex`, import.meta.url), "utf8").trim());

test("a CALL frame decodes and re-encodes byte for byte", () => {
  const bytes = golden("call");
  const call = c.decodeCall(bytes);
  assert.equal(call.request, 9n);
  assert.equal(call.command.command.args.procedure, "deploy");
  assert.equal(call.command.command.args.chute, "hello-web");
  assert.equal(call.command.command.request_id, 42n);
  assert.deepEqual(c.encodeCall(call.request, call.command), bytes);
});

test("command and grant canonical bytes match the fixtures", async () => {
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
});

test("a command decoded from its canonical body describes what is signed", () => {
  const sc = c.decodeCall(golden("call")).command;
  const body = golden("command_canonical").slice(c.COMMAND_TAG.length);
  const d = c.decodeCommand(body);
  assert.deepEqual(d, sc.command);
  assert.match(c.describe(d), /^deploy, chute hello-web, image sha256 abab/);
});

test("every argument shape round-trips", () => {
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
});

test("device-signed results verify, and a tampered one does not", async () => {
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
});

test("frames of other versions or types and trailing bytes are refused", () => {
  const v1 = golden("v1/call");
  assert.throws(() => c.decodeCall(v1), /protocol version 1/);
  assert.throws(() => c.decodeCall(golden("result_ok")), /frame type 50/);
  assert.throws(() => c.decodeCall(c.concat(golden("call"), Uint8Array.of(0))), /trailing/);
  assert.throws(() => c.decodeCall(golden("call").slice(0, 40)), /truncated/);
});

test("names the device would refuse are refused before signing", () => {
  const base = c.decodeCall(golden("call")).command.command;
  for (const chute of ["", "A-web", "-web", "web-", "x".repeat(41), "a web"]) {
    assert.throws(() => c.encodeCommand({ ...base, args: { procedure: "stop", chute } }), /chute/);
  }
});
