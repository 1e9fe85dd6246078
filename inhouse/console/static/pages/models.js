// Models: every model and deployment with state, health, version, engine, context length, capabilities, and
// live request rate, TTFT and error rate (the difference of two reads of /metrics/models); for admins, swap
// (with an optional canary share), rollback and reload.
import { html, useEffect, useRef, useState } from '../vendor/htm-preact-standalone.js';
import { api, listModels } from '../api.js';
import { useT } from '../i18n.js';

const POLL_MS = 5000;
const STATE_EVERY = 3;  // polls

function live(now, before) {
  // per model: requests/s, mean TTFT (ms) and error share over the last poll; over the whole run at first
  const out = {};
  for (const [name, m] of Object.entries(now.models)) {
    const b = (before && before.models[name]) || null;
    const dt = b ? now.at - before.at : 0;
    const d = (f) => m[f] - (b ? b[f] : 0);
    const requests = d('requests');
    const ttftCount = d('ttft_count') || m.ttft_count;
    const ttftSum = d('ttft_count') ? d('ttft_sum') : m.ttft_sum;
    const errorBase = requests || m.requests;
    const errors = requests ? d('errors') : m.errors;
    out[name] = { rate: dt > 0 ? requests / dt : null, ttft: ttftCount ? (1000 * ttftSum) / ttftCount : null,
                  errors: errorBase ? errors / errorBase : null, total: m.requests };
  }
  return out;
}

function SwapForm({ name, done }) {
  const t = useT();
  const [path, setPath] = useState('');
  const [version, setVersion] = useState('');
  const [canary, setCanary] = useState('');
  const [seconds, setSeconds] = useState('');
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    const body = {};
    if (path.trim()) body.path = path.trim();
    if (version.trim()) body.version = version.trim();
    if (String(canary).trim()) body.canary = Number(canary) / 100;
    if (String(canary).trim() && String(seconds).trim()) body.canary_window_s = Number(seconds);
    setBusy(true);  // a canary answers when its window ends
    await done(`/admin/models/${encodeURIComponent(name)}/swap`, body);
    setBusy(false);
  };
  return html`<form class="swap" onSubmit=${submit}>
    <input name="path" placeholder=${t('newPath')} value=${path} onInput=${(e) => setPath(e.target.value)}/>
    <input name="version" placeholder=${t('version')} value=${version} onInput=${(e) => setVersion(e.target.value)}/>
    <input name="canary" type="number" min="1" max="99" placeholder=${t('canaryPct')} value=${canary} onInput=${(e) => setCanary(e.target.value)}/>
    ${canary && html`<input name="canary_window_s" type="number" min="1" placeholder=${t('canaryWindow')} value=${seconds} onInput=${(e) => setSeconds(e.target.value)}/>`}
    <button type="submit" name="swap" disabled=${busy}>${busy ? t('swapping') : canary ? t('canary') : t('swap')}</button></form>`;
}

export function Models({ admin }) {
  const t = useT();
  const [cards, setCards] = useState([]);
  const [states, setStates] = useState({});
  const [numbers, setNumbers] = useState({});
  const [message, setMessage] = useState(null);
  const last = useRef(null);
  const readStates = async () => {
    try { setCards(await listModels()); } catch (err) { setMessage({ error: err.message }); }
    if (admin) {
      try {
        const found = (await api('/admin/models')).data;
        setStates(Object.fromEntries(found.map((m) => [m.id, m])));
      } catch (_) { /* shown from the cards alone */ }
    }
  };
  const readNumbers = async () => {
    try {
      const now = await api('/metrics/models');
      setNumbers(live(now, last.current));
      last.current = now;
    } catch (_) { /* metrics not public and this key cannot read them */ }
  };
  const poll = async () => { await readStates(); await readNumbers(); };
  useEffect(() => {
    // every read with a key is an audited call: numbers every 5 s, states every 15 s, nothing while hidden
    poll();
    let ticks = 0;
    const timer = setInterval(() => {
      if (document.hidden) return;
      ticks += 1;
      if (ticks % STATE_EVERY === 0) readStates();
      readNumbers();
    }, POLL_MS);
    return () => clearInterval(timer);
  }, [admin]);
  const call = async (path, body = {}) => {
    setMessage(null);
    try { setMessage({ ok: JSON.stringify(await api(path, { method: 'POST', body }), null, 2) }); } catch (err) {
      setMessage({ error: err.message });
    }
    poll();
  };
  const pct = (v) => (v === null || v === undefined ? '–' : `${(100 * v).toFixed(1)}%`);
  const num = (v, digits = 2) => (v === null || v === undefined ? '–' : v.toFixed(digits));

  return html`<section class="page models">
    ${admin && html`<div class="toolbar"><button type="button" name="reload" onClick=${() => call('/admin/reload')}>${t('reloadConfig')}</button></div>`}
    ${message && html`<pre class=${message.error ? 'error' : 'result'}>${message.error || message.ok}</pre>`}
    <table class="list">
      <thead><tr><th>${t('model')}</th><th>${t('state')}</th><th>${t('health')}</th><th>${t('version')}</th><th>${t('engine')}</th>
        <th>${t('context')}</th><th>${t('capabilities')}</th><th>${t('reqPerS')}</th><th>TTFT ms</th><th>${t('errorRate')}</th>
        ${admin && html`<th>${t('actions')}</th>`}</tr></thead>
      <tbody>${cards.map((m) => {
        const n = numbers[m.id] || {};
        const deployments = (states[m.id] && states[m.id].deployments) || m.deployments || [];
        const healthy = deployments.filter((d) => d.healthy !== false).length;
        return html`<tr key=${m.id} data-model=${m.id} data-state=${m.state}>
          <td><b>${m.id}</b><ul class="deployments">
            ${deployments.map((d) => html`<li data-deployment=${d.name}>${d.name}: ${t(d.state || d.status)}${d.healthy === false ? ` · ${t('unhealthy')}` : ''}${d.in_flight ? ` · ${d.in_flight} ${t('inFlight')}` : ''}${d.error ? ` (${d.error})` : ''}</li>`)}</ul></td>
          <td><span class=${'pill ' + m.state}>${t(m.state)}</span></td>
          <td>${healthy}/${deployments.length}${deployments.some((d) => d.circuit && d.circuit !== 'closed') ? ` · ${t('circuit')} ${deployments.map((d) => d.circuit).join(',')}` : ''}</td>
          <td class="nowrap">${m.version || "–"}</td><td>${m.engine}</td><td>${m.max_model_len || '–'}</td>
          <td>${(m.capabilities || []).map((c) => html`<span class="tag">${c}</span>`)}</td>
          <td>${num(n.rate)}</td><td>${num(n.ttft, 0)}</td><td>${pct(n.errors)}</td>
          ${admin && html`<td class="actions"><${SwapForm} name=${m.id} done=${call}/>
            <button type="button" name="rollback" onClick=${() => call(`/admin/models/${encodeURIComponent(m.id)}/rollback`)}>${t('rollback')}</button></td>`}
        </tr>`;
      })}</tbody>
    </table>
    <p class="hint">${t('modelsHint')}</p>
  </section>`;
}
