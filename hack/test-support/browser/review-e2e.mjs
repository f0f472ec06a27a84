// Headless Chromium as an output checker, for operator/tests/review_page.rs. One scenario per run:
//   node review-e2e.mjs '<json options>'
// The result is one JSON line on stdout: {"result": {...}}. Debian's /usr/bin/chromium is used.
//   checker:   sign in, open /review, open the output, read the marked cell, screenshot, try a
//              decision without the CSRF token (refused), approve with a reason.
//   requester: sign in as the output's requester; the page has no forms; a hand-made approve
//              with the session's own CSRF token is refused by the API and the page says so.
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2]);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

const context = await chromium.launchPersistentContext(opts.profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1200, height: 900 },
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', `--ignore-certificate-errors-spki-list=${opts.spki}`,
  ],
});
const page = context.pages()[0] || (await context.newPage());
const result = { scenario: opts.scenario, cspViolations: [], consoleErrors: [] };
page.on('console', (m) => {
  if (m.type() !== 'error') return;
  result.consoleErrors.push(m.text());
  if (m.text().includes('Content Security Policy')) result.cspViolations.push(m.text());
});

async function signIn() {
  await page.goto(opts.gateway + '/');
  await page.locator('#signin').click();
  await page.waitForSelector('#refusal, body[data-ready="1"]', { timeout: 30000 });
  if (await page.locator('#refusal').count()) throw new Error('sign-in refused: ' + (await page.locator('#refusal').textContent()));
}

// A form the page did not render, submitted by the browser itself (same origin, the session
// cookie): `build` runs in the page and submits a form. Returns the answer's status and the
// refusal's code and text.
async function forge(build, arg) {
  const [response] = await Promise.all([page.waitForNavigation(), page.evaluate(build, arg)]);
  const refusal = page.locator('#refusal');
  const found = await refusal.count();
  return {
    status: response.status(),
    code: found ? await refusal.getAttribute('data-code') : null,
    text: found ? await refusal.textContent() : null,
  };
}

// Post `fields` to `action` from a form made in the page.
const handMade = ([action, fields]) => {
  const f = document.createElement('form');
  f.method = 'post';
  f.action = action;
  for (const [k, v] of Object.entries(fields)) {
    const i = document.createElement('input');
    i.type = 'hidden'; i.name = k; i.value = v;
    f.appendChild(i);
  }
  document.body.appendChild(f);
  f.submit();
};

try {
  await signIn();
  const response = await page.goto(opts.gateway + '/review');
  result.listStatus = response.status();
  result.csp = response.headers()['content-security-policy'];
  const link = page.locator(`a.output[href="${opts.outputPath}"]`);
  result.listed = await link.count();
  if (opts.scenario === 'checker') {
    await link.click();
    await page.waitForSelector('table.noexit-table');
    result.user = await page.locator('#user').textContent();
    const cells = page.locator('table.noexit-table td.fail');
    result.failCells = await cells.evaluateAll((tds) => tds.map((td) => ({
      text: td.textContent, title: td.getAttribute('title'),
      line: td.parentElement.querySelector('td.line').textContent,
      column: Array.from(td.parentElement.children).indexOf(td),
      background: getComputedStyle(td).backgroundColor,
    })));
    result.checkRows = await page.locator('table.noexit-checks tr').count();
    result.scripts = await page.locator('script').count();
    await page.locator('td.fail').first().scrollIntoViewIfNeeded();
    await page.screenshot({ path: opts.screenshot, fullPage: true });
    const csrf = await page.locator('#form-approve input[name=csrf]').inputValue();
    const action = opts.outputPath + '/approve';
    result.forged = await forge(handMade, [action, { reason: 'forged' }]);
    await page.goto(opts.gateway + opts.outputPath);
    result.forgedWrongToken = await forge(handMade, [action, { csrf: csrf + 'x', reason: 'forged' }]);
    await page.goto(opts.gateway + opts.outputPath);
    await page.locator('#form-approve textarea[name=reason]').fill(opts.reason);
    await page.locator('#approve').click();
    await page.waitForSelector('#notice', { timeout: 20000 });
    result.notice = await page.locator('#notice').textContent();
    result.url = page.url();
    result.reviews = await page.locator('#reviews').textContent();
    result.formsAfter = await page.locator('.decisions form').count();
  } else if (opts.scenario === 'requester') {
    await page.goto(opts.gateway + opts.outputPath);
    result.own = await page.locator('#own').count();
    result.forms = await page.locator('.decisions form').count();
    result.noContent = await page.locator('#no-content').getAttribute('data-code');
    const csrf = await page.locator('header form input[name=csrf]').inputValue();
    result.selfReview = await forge(handMade, [opts.outputPath + '/approve', { csrf, reason: 'looks fine to me' }]);
  }
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e && e.stack || e);
  try { await page.screenshot({ path: opts.screenshot + '.error.png', fullPage: true }); } catch (e2) { /* ignore */ }
}
say({ result });
await context.close();
