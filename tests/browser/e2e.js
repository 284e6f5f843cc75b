// Drives Debian's Chromium with playwright-core: opens the xterm.js page,
// types into the terminal and waits for the shell's answers on screen.
// Called by run.sh; everything comes from the environment:
//   E2E_MODULES  node_modules dir holding playwright-core
//   E2E_URL      the page (http://127.0.0.1:PORT/index.html)
//   E2E_WS_PORT  the connector's port
//   AION_TOKEN   the project token (kept out of argv)
//   E2E_PROFILE  a fresh, empty user-data-dir
//   E2E_SHOT     where the screenshot goes
//   E2E_CHROMIUM chromium executable (default /usr/bin/chromium)
'use strict';
const path = require('path');
const { chromium } = require(path.join(process.env.E2E_MODULES, 'playwright-core'));

const STEP_MS = 15000;

function fail(msg) {
  const err = new Error(msg);
  err.e2e = true;
  throw err;
}

async function screen(page) {
  return page.evaluate(() => window.screenLines());
}

// Waits until a line of the xterm buffer, trimmed, equals `want`.
async function waitForLine(page, want, what) {
  try {
    await page.waitForFunction(
      (w) => window.screenLines().some((l) => l.trim() === w),
      want,
      { timeout: STEP_MS, polling: 50 },
    );
  } catch (e) {
    const lines = (await screen(page)).filter((l) => l.trim() !== '');
    const events = await page.evaluate(() => window.wsEvents.join(', '));
    fail(`${what}: no line "${want}" on the terminal within ${STEP_MS} ms\n` +
      `  websocket events: ${events || 'none'}\n  screen:\n` +
      lines.map((l) => '    | ' + l).join('\n'));
  }
}

async function main() {
  const exe = process.env.E2E_CHROMIUM || '/usr/bin/chromium';
  const context = await chromium.launchPersistentContext(process.env.E2E_PROFILE, {
    executablePath: exe,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1000, height: 620 },
    timeout: 30000,
  });
  const logs = [];
  try {
    const page = context.pages()[0] || await context.newPage();
    page.on('console', (m) => logs.push(`console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
    const url = `${process.env.E2E_URL}#port=${process.env.E2E_WS_PORT}` +
      `&token=${encodeURIComponent(process.env.AION_TOKEN)}`;
    await page.goto(url, { timeout: STEP_MS });
    try {
      await page.waitForFunction(() => window.wsEvents && window.wsEvents.length > 0,
        null, { timeout: STEP_MS });
    } catch (e) {
      fail('the WebSocket neither opened nor failed');
    }
    const first = await page.evaluate(() => window.wsEvents[0]);
    if (first !== 'open') fail(`the WebSocket did not open: ${first}`);
    // Some output (the prompt) before typing, so the shell is reading.
    try {
      await page.waitForFunction(() => window.screenLines().some((l) => l.trim() !== ''),
        null, { timeout: STEP_MS });
    } catch (e) {
      fail('no shell prompt on the terminal');
    }
    await page.click('#terminal');
    await page.keyboard.type('echo hi-$((40+2))', { delay: 10 });
    await page.keyboard.press('Enter');
    await waitForLine(page, 'hi-42', 'echo hi-$((40+2))');
    // The page sent {"type":"resize","cols":100,"rows":30} on open.
    await page.keyboard.type('stty size', { delay: 10 });
    await page.keyboard.press('Enter');
    await waitForLine(page, '30 100', 'stty size after the resize message');
    // UTF-8 output, written by term.write(e.data) as it comes.
    await page.keyboard.type("printf '\\303\\251t\\303\\251-%s\\n' $((40+2))", { delay: 5 });
    await page.keyboard.press('Enter');
    await waitForLine(page, '\u00e9t\u00e9-42', 'printf of UTF-8');
    await page.screenshot({ path: process.env.E2E_SHOT });
    const lines = (await screen(page)).filter((l) => l.trim() !== '');
    console.log('screen:\n' + lines.map((l) => '    | ' + l).join('\n'));
  } catch (e) {
    try {
      const page = context.pages()[0];
      if (page) await page.screenshot({ path: process.env.E2E_SHOT });
    } catch (_) { /* the failure is reported below */ }
    if (logs.length) console.error('page log:\n  ' + logs.join('\n  '));
    throw e;
  } finally {
    await context.close();
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`FAIL: ${e.e2e ? e.message : (e.stack || e)}`);
    process.exit(1);
  },
);
