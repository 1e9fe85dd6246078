// Keys (admin): create (the secret shown once, with a copy button), list, revoke, rotate, limits, and each
// budgeted key's usage this period (its audit rows' tokens since the period began) against its budget.
import { html, useEffect, useState } from '../vendor/htm-preact-standalone.js';
import { api } from '../api.js';
import { CopyButton } from '../copy.js';
import { useT } from '../i18n.js';

const when = (s) => (s ? new Date(s * 1000).toLocaleString() : '–');
const blank = { name: '', admin: false, models: '', rpm: '', tpm: '', max_concurrency: '', token_budget: '',
                budget_period: 'month' };

function periodStart(period) {
  const now = new Date();  // the server counts budgets in UTC
  return (period === 'day' ? Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate())
                           : Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)) / 1000;
}

async function usageOf(key) {
  const rows = (await api(`/admin/audit?key=${encodeURIComponent(key.id)}&since=${periodStart(key.budget_period)}&limit=10000`)).data;
  return rows.reduce((sum, r) => sum + (r.prompt_tokens || 0) + (r.completion_tokens || 0), 0);
}

function createBody(form) {
  const body = { name: form.name.trim(), admin: form.admin };
  if (form.models.trim()) body.models = form.models.split(',').map((m) => m.trim()).filter(Boolean);
  for (const field of ['rpm', 'tpm', 'max_concurrency', 'token_budget']) {
    if (String(form[field]).trim()) body[field] = Number(form[field]);
  }
  if (body.token_budget) body.budget_period = form.budget_period;
  return body;
}

export function Keys() {
  const t = useT();
  const [keys, setKeys] = useState([]);
  const [usage, setUsage] = useState({});
  const [form, setForm] = useState(blank);
  const [secret, setSecret] = useState(null);
  const [problem, setProblem] = useState('');
  const load = async () => {
    try {
      const found = (await api('/admin/keys')).data;
      setKeys(found);
      const used = {};
      for (const k of found.filter((k) => k.token_budget && k.status === 'active')) used[k.id] = await usageOf(k);
      setUsage(used);
    } catch (err) { setProblem(err.message); }
  };
  useEffect(() => { load(); }, []);
  const act = async (what, path) => {
    setProblem('');
    try {
      const result = await api(path, { method: 'POST', body: {} });
      if (result.secret) setSecret({ name: result.name, secret: result.secret, what });
      await load();
    } catch (err) { setProblem(err.message); }
  };
  const create = async (e) => {
    e.preventDefault();
    setProblem('');
    try {
      const made = await api('/admin/keys', { method: 'POST', body: createBody(form) });
      setSecret({ name: made.name, secret: made.secret, what: 'created' });
      setForm(blank);
      await load();
    } catch (err) { setProblem(err.message); }
  };
  const set = (field) => (e) => setForm({ ...form, [field]: e.target.type === 'checkbox' ? e.target.checked : e.target.value });
  const limits = (k) => [k.rpm && `${k.rpm} rpm`, k.tpm && `${k.tpm} tpm`, k.max_concurrency && `${k.max_concurrency} ${t('concurrent')}`]
    .filter(Boolean).join(' · ') || '–';
  const budget = (k) => {
    if (!k.token_budget) return '–';
    const used = usage[k.id];
    const share = used === undefined ? 0 : Math.min(100, (100 * used) / k.token_budget);
    return html`<div class="budget" title=${`${used ?? '?'} / ${k.token_budget}`}>
      <div class="meter"><div style=${`width:${share}%`}></div></div>
      ${used ?? '?'} / ${k.token_budget} ${t('per_' + k.budget_period)}</div>`;
  };

  return html`<section class="page keys">
    ${secret && html`<div class="secret" data-testid="secret">
      <p><b>${secret.name}</b>: ${t('secretOnce')}</p>
      <code class="secret-value">${secret.secret}</code> <${CopyButton} text=${secret.secret}/>
      <button type="button" name="dismiss" onClick=${() => setSecret(null)}>${t('dismiss')}</button></div>`}
    ${problem && html`<div class="error">${problem}</div>`}
    <form class="create-key" onSubmit=${create}>
      <h3>${t('createKey')}</h3>
      <label>${t('name')}<input name="name" required value=${form.name} onInput=${set('name')}/></label>
      <label class="check"><input name="admin" type="checkbox" checked=${form.admin} onChange=${set('admin')}/>${t('adminKey')}</label>
      <label>${t('modelsAllowed')}<input name="models" placeholder=${t('allModels')} value=${form.models} onInput=${set('models')}/></label>
      <label>rpm<input name="rpm" type="number" min="1" value=${form.rpm} onInput=${set('rpm')}/></label>
      <label>tpm<input name="tpm" type="number" min="1" value=${form.tpm} onInput=${set('tpm')}/></label>
      <label>${t('maxConcurrency')}<input name="max_concurrency" type="number" min="1" value=${form.max_concurrency} onInput=${set('max_concurrency')}/></label>
      <label>${t('tokenBudget')}<input name="token_budget" type="number" min="1" value=${form.token_budget} onInput=${set('token_budget')}/></label>
      <label>${t('budgetPeriod')}<select name="budget_period" value=${form.budget_period} onChange=${set('budget_period')}>
        <option value="day">${t('day')}</option><option value="month">${t('month')}</option></select></label>
      <button type="submit" class="primary" name="create">${t('create')}</button>
    </form>
    <table class="list">
      <thead><tr><th>${t('name')}</th><th>id</th><th>${t('prefix')}</th><th>${t('status')}</th><th>admin</th>
        <th>${t('models')}</th><th>${t('limits')}</th><th>${t('budgetUsage')}</th><th>${t('created')}</th><th></th></tr></thead>
      <tbody>${keys.map((k) => html`<tr key=${k.id} data-key=${k.name} data-status=${k.status}>
        <td>${k.name}</td><td><code>${k.id}</code></td><td><code>${k.prefix}…</code></td>
        <td><span class=${'pill ' + k.status}>${t(k.status)}</span></td><td>${k.admin ? '✔' : ''}</td>
        <td>${k.models === null ? t('all') : k.models.join(', ') || t('none')}</td><td>${limits(k)}</td>
        <td>${budget(k)}</td><td>${when(k.created_at)}</td>
        <td class="actions">${k.status === 'active' && html`
          <button type="button" name="rotate" onClick=${() => act('rotated', `/admin/keys/${k.id}/rotate`)}>${t('rotate')}</button>
          <button type="button" name="revoke" class="danger" onClick=${() => act('revoked', `/admin/keys/${k.id}/revoke`)}>${t('revoke')}</button>`}</td>
      </tr>`)}</tbody>
    </table>
  </section>`;
}
