// Headless Chromium as the researcher, for operator/tests/gateway.rs. One scenario per run:
//   node gateway-e2e.mjs '<json options>'
// Progress lines and the result are JSON objects on stdout, one per line; the result is the
// line with "result". Debian's /usr/bin/chromium is used; nothing is downloaded.
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';

const opts = JSON.parse(process.argv[2]);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function poll(what, fn, timeoutMs = 20000, everyMs = 200) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await sleep(everyMs);
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

async function dropCount(reason) {
  const text = await (await fetch(opts.metricsUrl)).text();
  const line = text.split('\n').find((l) => l.startsWith(`noexit_gateway_rfb_drops_total{reason="${reason}"}`));
  return line ? Number(line.trim().split(' ').pop()) : 0;
}

function run(cmd) {
  return execFileSync(cmd[0], cmd.slice(1), { encoding: 'latin1', timeout: 10000 });
}

const context = await chromium.launchPersistentContext(opts.profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1100, height: 800 },
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', `--ignore-certificate-errors-spki-list=${opts.spki}`,
  ],
});
const page = context.pages()[0] || (await context.newPage());
const frames = [];
page.on('websocket', (ws) => {
  ws.on('framereceived', (f) => frames.push(Buffer.isBuffer(f.payload) ? f.payload : Buffer.from(f.payload, 'latin1')));
});
const result = { scenario: opts.scenario };

async function signIn() {
  await page.goto(opts.gateway + '/');
  await page.locator('#signin').click();
  // Either the callback refused (its page names the code) or the page came back signed in.
  await page.waitForSelector('#refusal, body[data-ready="1"]', { timeout: 30000 });
  const refusal = page.locator('#refusal');
  if (await refusal.count()) {
    return { refused: await refusal.getAttribute('data-code'), message: await refusal.textContent() };
  }
  return { user: await page.locator('#user').textContent() };
}

async function connect(workspace) {
  await page.selectOption('#workspace', workspace);
  await page.click('#connect');
  await poll('Connected in the status line', async () => (await page.locator('#status').textContent()).startsWith('Connected'));
}

async function magentaPixels() {
  return page.evaluate(() => {
    const c = document.querySelector('#screen canvas');
    if (!c || !c.width) return 0;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 60 && d[i + 2] > 200 && d[i + 3] > 200) n++;
    return n;
  });
}

// A WebSocket speaking RFB by hand from the page (same origin, the page's cookies): does the
// gateway's handshake, sends `after`, and reports how the connection ended.
async function raw(path, after) {
  return page.evaluate(({ path, after }) => new Promise((resolve) => {
    const ws = new WebSocket(`wss://${location.host}${path}`);
    ws.binaryType = 'arraybuffer';
    let buf = new Uint8Array(0);
    let stage = 0;
    let opened = false;
    let received = 0;
    const take = (n) => { const h = buf.slice(0, n); buf = buf.slice(n); return h; };
    ws.onopen = () => { opened = true; };
    ws.onmessage = (e) => {
      const b = new Uint8Array(e.data);
      received += b.length;
      const joined = new Uint8Array(buf.length + b.length);
      joined.set(buf); joined.set(b, buf.length); buf = joined;
      for (;;) {
        if (stage === 0 && buf.length >= 12) { take(12); ws.send(new TextEncoder().encode('RFB 003.008\n')); stage = 1; }
        else if (stage === 1 && buf.length >= 2) { take(2); ws.send(new Uint8Array([1])); stage = 2; }
        else if (stage === 2 && buf.length >= 4) { take(4); ws.send(new Uint8Array([1])); stage = 3; }
        else if (stage === 3 && buf.length >= 24) {
          const len = new DataView(buf.buffer).getUint32(20);
          if (buf.length < 24 + len) break;
          take(24 + len); stage = 4;
          if (after.length) ws.send(new Uint8Array(after));
        } else break;
      }
    };
    ws.onclose = (e) => resolve({ opened, stage, received, code: e.code, reason: e.reason });
    setTimeout(() => { try { ws.close(); } catch (e) { /* closed */ } resolve({ opened, stage, received, timeout: true }); }, 15000);
  }), { path, after });
}

try {
  if (opts.scenario === 'signin') {
    Object.assign(result, await signIn());
  } else if (opts.scenario === 'desktop') {
    Object.assign(result, await signIn());
    await connect(opts.workspace);
    result.magenta = await poll('the magenta window on the canvas', async () => {
      const n = await magentaPixels();
      return n > 2000 ? n : 0;
    });
    // The desktop's clipboard is set only now (Xvnc sends a selection to connected clients).
    const before = await dropCount('server_cut_text');
    const xclip = spawn(opts.clipboardSet[0], opts.clipboardSet.slice(1), { stdio: ['pipe', 'ignore', 'ignore'] });
    xclip.stdin.end(opts.clipMarker);
    result.serverCutTextDrops = await poll('the gateway dropping the desktop clipboard',
      async () => { const n = await dropCount('server_cut_text'); return n > before ? n : 0; });
    // Paste in through the page's paste box.
    const refusedBefore = await dropCount('paste_refused');
    await page.fill('#paste-text', opts.paste);
    await page.click('#paste-send');
    if (opts.pasteExpected) {
      result.pasted = await poll('the paste on the desktop clipboard', async () => {
        try { return run(opts.clipboardGet).includes(opts.paste); } catch (e) { return false; }
      }, 10000);
    } else {
      await poll('the gateway refusing the paste', async () => (await dropCount('paste_refused')) > refusedBefore);
      let now = '';
      try { now = run(opts.clipboardGet); } catch (e) { now = ''; }
      result.pasted = now.includes(opts.paste);
    }
    // Give the desktop time to send its clipboard again after the paste changed it.
    await sleep(1000);
    xclip.kill();
    const all = Buffer.concat(frames);
    result.framesReceived = frames.length;
    result.bytesReceived = all.length;
    result.markerInFrames = all.includes(Buffer.from(opts.clipMarker, 'latin1'));
    result.clipboardEvents = await page.evaluate(() => window.noexitClipboardEvents || []);
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: opts.gateway });
    result.pageClipboard = await page.evaluate(async () => {
      try { return await navigator.clipboard.readText(); } catch (e) { return `unreadable: ${e}`; }
    });
    result.watermark = await page.locator('#watermark').getAttribute('data-text');
    // The watermark layer covers the canvas, above it (z-index), and has text drawn inside the
    // canvas' area.
    const wm = await page.locator('#watermark').boundingBox();
    const canvas = await page.locator('#screen canvas').boundingBox();
    const inside = await page.evaluate(() => {
      const c = document.querySelector('#screen canvas').getBoundingClientRect();
      return [...document.querySelectorAll('#watermark span')].filter((s) => {
        const r = s.getBoundingClientRect();
        return r.left < c.right && r.right > c.left && r.top < c.bottom && r.bottom > c.top;
      }).length;
    });
    result.watermarkOverCanvas = !!(wm && canvas && wm.x <= canvas.x + 1 && wm.y <= canvas.y + 1
      && wm.x + wm.width >= canvas.x + canvas.width - 1 && wm.y + wm.height >= canvas.y + canvas.height - 1 && inside > 0);
    result.watermarkSpansOverCanvas = inside;
    result.watermarkVisible = await page.locator('#watermark span').first().isVisible();
    result.status = await page.locator('#status').textContent();
    await page.screenshot({ path: opts.screenshot });
    await page.click('#disconnect');
    result.afterDisconnect = await poll('Disconnected in the status line', async () => {
      const s = await page.locator('#status').textContent();
      return s.startsWith('Disconnected') ? s : null;
    });
  } else if (opts.scenario === 'cut') {
    Object.assign(result, await signIn());
    await connect(opts.workspace);
    say({ event: 'connected' });
    result.status = await poll('the session being cut', async () => {
      const s = await page.locator('#status').textContent();
      return s.startsWith('Disconnected') ? s : null;
    }, 40000);
  } else if (opts.scenario === 'refusals') {
    // Not signed in: no cookie at all.
    await page.goto(opts.gateway + '/');
    result.noSession = await raw(`/ws/${opts.workspace}`, []);
    // A cookie this gateway never issued.
    await context.addCookies([{ name: '__Host-noexit-gateway', value: 'forged-' + 'x'.repeat(40), url: opts.gateway, secure: true, httpOnly: true, sameSite: 'Strict' }]);
    result.forged = await raw(`/ws/${opts.workspace}`, []);
    await context.clearCookies();
    Object.assign(result, await signIn());
    const cookie = (await context.cookies(opts.gateway)).find((c) => c.name === '__Host-noexit-gateway');
    result.wrongOwner = await raw(`/ws/${opts.wrongWorkspace}`, []);
    result.stopped = await raw(`/ws/${opts.stoppedWorkspace}`, []);
    // A hostile client: a message type RFB does not define, after a clean handshake.
    result.hostileClient = await raw(`/ws/${opts.workspace}`, [0x99, 0, 0, 0, 0, 0, 0, 0]);
    // A SetEncodings that claims more encodings than the limit.
    result.hostileClient2 = await raw(`/ws/${opts.workspace}`, [2, 0, 0xff, 0xff]);
    for (const [name, ws] of Object.entries(opts.hostileServers || {})) {
      result[name] = await raw(`/ws/${ws}`, []);
    }
    // Sign out, then replay the old cookie.
    await page.click('#logout button');
    await page.waitForSelector('#signin:not([hidden])', { timeout: 10000 });
    await context.addCookies([{ name: cookie.name, value: cookie.value, url: opts.gateway, secure: true, httpOnly: true, sameSite: 'Strict' }]);
    result.replayed = await raw(`/ws/${opts.workspace}`, []);
    result.meAfterReplay = await page.evaluate(async () => (await fetch('/api/me')).status);
  }
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e && e.stack || e);
  try { await page.screenshot({ path: (opts.screenshot || '/tmp/gateway-e2e') + '.error.png' }); } catch (e2) { /* ignore */ }
  try { result.statusAtError = await page.locator('#status').textContent(); } catch (e2) { /* ignore */ }
}
await context.close();
say({ result });
