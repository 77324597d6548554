// The RabbitMQ management UI of the compose deployment, in headless Chromium: log in
// as guest, open the queues page, check that it lists the DLQ, the retry ladder in
// order and the work queue (the queues of rabbitmq/definitions.json), and save a
// screenshot. Exits non-zero when any of it fails.
//
//   node ui-check/queues-page.mjs UI_URL SCREENSHOT.png [--chromium PATH]

import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const flag = args.indexOf("--chromium");
const executablePath = flag >= 0 ? args.splice(flag, 2)[1] : "/usr/bin/chromium";
const [base, screenshot] = args;
if (!base || !screenshot) {
  console.error("usage: queues-page.mjs UI_URL SCREENSHOT.png [--chromium PATH]");
  process.exit(2);
}

// What the UI must show, in its default order (by name): the DLQ, every retry level
// in ladder order (their names carry the level number), the work queue.
const here = dirname(fileURLToPath(import.meta.url));
const definitions = JSON.parse(readFileSync(join(here, "../rabbitmq/definitions.json"), "utf8"));
const names = definitions.queues.map((q) => q.name);
const work = names.find((n) => n.endsWith(".work"));
const dlq = names.find((n) => n.endsWith(".dlq"));
const ladder = names.filter((n) => n.includes(".retry."));
const expected = [dlq, ...ladder, work];

const profile = mkdtempSync(join(tmpdir(), "ui-check-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1440, height: 1100 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const fail = (message) => {
  throw new Error(message);
};
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20000);
  await page.goto(base);
  await page.fill('input[name="username"]', "guest");
  await page.fill('input[name="password"]', "guest");
  await page.press('input[name="password"]', "Enter");
  await page.waitForSelector("#logout", { state: "attached" });

  await page.goto(`${base}/#/queues`);
  await page.waitForSelector(`a[href$="/${encodeURIComponent(work)}"]`);
  const listed = await page.$$eval('table.list a[href^="#/queues/"]', (links) =>
    links.map((a) => a.textContent.trim()),
  );
  const ours = listed.filter((n) => expected.includes(n));
  if (JSON.stringify(ours) !== JSON.stringify(expected)) {
    fail(`the queues page lists\n  ${ours.join("\n  ")}\nexpected\n  ${expected.join("\n  ")}`);
  }
  const rows = await page.$$eval("table.list tbody tr", (rows) => rows.length);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(
    `ui-check: logged in as guest; the queues page lists ${expected.length} queues in order ` +
      `(${dlq}, ${ladder[0]} .. ${ladder[ladder.length - 1]}, ${work}) in ${rows} rows; ` +
      `screenshot ${screenshot}`,
  );
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
