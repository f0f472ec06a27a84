// The page around noVNC: sign-in state, workspace picker, connect/disconnect, status line,
// paste box, and the watermark (user, workspace, time) over the desktop.
import RFB from '/novnc/core/rfb.js';

const $ = (id) => document.getElementById(id);
let me = null;
let rfb = null;
let current = null;

function status(text) {
  $('status').textContent = text;
}

function watermark() {
  const when = new Date().toISOString().slice(0, 19).replace('T', ' ') + ' UTC';
  const text = `${me.user} · ${current || 'no workspace'} · ${when}`;
  const wm = $('watermark');
  wm.dataset.text = text;
  wm.replaceChildren(...Array.from({ length: 12 }, () => {
    const s = document.createElement('span');
    s.textContent = text;
    return s;
  }));
}

async function lastEnd(ws) {
  try {
    const list = await (await fetch('/api/sessions')).json();
    const mine = list.filter((s) => `${s.project}/${s.workspace}` === ws && s.ended);
    return mine.length ? mine[mine.length - 1].endReason : null;
  } catch (e) {
    return null;
  }
}

function connect() {
  const choice = $('workspace').value;
  if (!choice) return;
  const [project, workspace] = choice.split('/');
  current = choice;
  watermark();
  const url = `wss://${location.host}/ws/${encodeURIComponent(project)}/${encodeURIComponent(workspace)}`;
  status(`Connecting to ${choice}…`);
  rfb = new RFB($('screen'), url);
  rfb.scaleViewport = true;
  window.noexitRfb = rfb;
  rfb.addEventListener('connect', () => {
    status(`Connected to ${choice}. Copying out is blocked.`);
    $('connect').disabled = true;
    $('disconnect').disabled = false;
    $('paste').hidden = false;
  });
  rfb.addEventListener('disconnect', async () => {
    $('connect').disabled = false;
    $('disconnect').disabled = true;
    $('paste').hidden = true;
    rfb = null;
    const why = await lastEnd(choice);
    status(`Disconnected from ${choice}${why ? ': ' + why : ''}`);
  });
  // Never fires: the gateway drops the desktop's clipboard. Kept so a test can prove it.
  rfb.addEventListener('clipboard', (e) => {
    window.noexitClipboardEvents = (window.noexitClipboardEvents || []).concat([e.detail.text]);
  });
}

async function init() {
  const r = await fetch('/api/me');
  if (r.status !== 200) {
    $('signin').hidden = false;
    status('Not signed in.');
    return;
  }
  me = await r.json();
  $('user').textContent = me.user;
  $('csrf').value = me.csrf;
  $('app').hidden = false;
  const list = await (await fetch('/api/workspaces')).json();
  const select = $('workspace');
  for (const w of list) {
    const o = document.createElement('option');
    o.value = `${w.project}/${w.workspace}`;
    o.textContent = o.value + (w.available ? '' : ` (unavailable: ${w.reason})`);
    o.disabled = !w.available;
    select.appendChild(o);
  }
  status(list.length ? `Signed in as ${me.user}. Pick a workspace and connect.` : `Signed in as ${me.user}; you own no workspace.`);
  watermark();
  setInterval(watermark, 1000);
  $('connect').addEventListener('click', connect);
  $('disconnect').addEventListener('click', () => rfb && rfb.disconnect());
  $('paste-send').addEventListener('click', () => {
    if (rfb) rfb.clipboardPasteFrom($('paste-text').value);
  });
  document.body.dataset.ready = '1';
}

init();
