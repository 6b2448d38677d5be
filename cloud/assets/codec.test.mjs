// Runs the codec cases (codec.cases.mjs) under Node: node --test cloud/assets/
import { test } from "node:test";
import { readFileSync } from "node:fs";
import * as c from "./codec.js";
import { cases } from "./codec.cases.mjs";

const golden = (name) =>
  c.unhex(readFileSync(new URL(`../../proto/tests/golden/${name}.hex`, import.meta.url), "utf8").trim());

for (const [name, f] of cases(golden)) test(name, f);
