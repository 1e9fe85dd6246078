// Audit: recent calls filtered by key, model, status and time; one call's detail; the hash chain's
// verification; export of what is shown (JSON lines or CSV, made in the browser).
import { html, useEffect, useState } from '../vendor/htm-preact-standalone.js';
import { api } from '../api.js';
import { useT } from '../i18n.js';

const COLUMNS = ['seq', 'at', 'request_id', 'method', 'path', 'status', 'error_code', 'latency_ms', 'ttft_ms',
                 'key_id', 'key_name', 'model', 'served_model', 'deployment', 'prompt_tokens',
                 'completion_tokens', 'stream', 'client_ip', 'row_hash'];

const seconds = (local) => (local ? String(new Date(local).getTime() / 1000) : '');

function download(name, text, type) {
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

const csvCell = (v) => (v === null || v === undefined ? '' : /[",\n]/.test(String(v)) ? `"${String(v).replaceAll('"', '""')}"` : String(v));

export function Audit() {
  const t = useT();
  const [filters, setFilters] = useState({ key: '', model: '', status: '', since: '', until: '', limit: 100, hideReads: true });
  const [rows, setRows] = useState([]);
  const [chosen, setChosen] = useState(null);
  const [verdict, setVerdict] = useState(null);
  const [problem, setProblem] = useState('');
  const search = async (e) => {
    if (e) e.preventDefault();
    setProblem('');
    const q = new URLSearchParams({ key: filters.key.trim(), model: filters.model.trim(),
                                    status: filters.status.trim(),
                                    since: seconds(filters.since), until: seconds(filters.until),
                                    limit: String(filters.limit) });
    try {
      const found = (await api(`/admin/audit?${q}`)).data;
      // status is filtered by the server (so the limit counts matching rows); reads are hidden here
      setRows(found.filter((r) => !(filters.hideReads && r.method === 'GET')));
    } catch (err) { setProblem(err.message); }
  };
  const verify = async () => {
    setVerdict(null);
    try { setVerdict(await api('/admin/audit/verify')); } catch (err) { setProblem(err.message); }
  };
  useEffect(() => { search(); }, []);
  const set = (field) => (e) => setFilters({ ...filters, [field]: e.target.value });
  const jsonl = () => rows.map((r) => JSON.stringify(r)).join('\n') + '\n';
  const csv = () => [COLUMNS.join(','), ...rows.map((r) => COLUMNS.map((c) => csvCell(r[c])).join(','))].join('\n') + '\n';

  return html`<section class="page audit">
    <form class="filters" onSubmit=${search}>
      <label>${t('key')}<input name="key" placeholder=${t('keyIdOrName')} value=${filters.key} onInput=${set('key')}/></label>
      <label>${t('model')}<input name="model" value=${filters.model} onInput=${set('model')}/></label>
      <label>${t('status')}<input name="status" placeholder="200, 4xx, 5xx" value=${filters.status} onInput=${set('status')}/></label>
      <label>${t('since')}<input name="since" type="datetime-local" value=${filters.since} onInput=${set('since')}/></label>
      <label>${t('until')}<input name="until" type="datetime-local" value=${filters.until} onInput=${set('until')}/></label>
      <label>${t('limit')}<input name="limit" type="number" min="1" max="10000" value=${filters.limit} onInput=${set('limit')}/></label>
      <label class="check"><input name="hide-reads" type="checkbox" checked=${filters.hideReads}
        onChange=${(e) => setFilters({ ...filters, hideReads: e.target.checked })}/>${t('hideReads')}</label>
      <button type="submit" class="primary" name="search">${t('search')}</button>
      <button type="button" name="verify" onClick=${verify}>${t('verifyChain')}</button>
      <button type="button" name="export-jsonl" onClick=${() => download('audit.jsonl', jsonl(), 'application/x-ndjson')}>${t('export')} JSONL</button>
      <button type="button" name="export-csv" onClick=${() => download('audit.csv', csv(), 'text/csv')}>${t('export')} CSV</button>
    </form>
    ${problem && html`<div class="error">${problem}</div>`}
    ${verdict && html`<div class=${'verdict ' + (verdict.ok ? 'ok' : 'bad')} data-ok=${String(verdict.ok)}>
      ${verdict.ok ? t('chainOk') : t('chainBroken')} (${verdict.rows} ${t('rows')})${verdict.problem ? `: ${verdict.problem}` : ''}</div>`}
    <div class="split">
      <table class="list rows">
        <thead><tr><th>${t('time')}</th><th>${t('key')}</th><th>${t('model')}</th><th>${t('path')}</th>
          <th>${t('status')}</th><th>ms</th><th>${t('tokens')}</th></tr></thead>
        <tbody>${rows.map((r) => html`<tr key=${r.seq} class=${chosen && chosen.seq === r.seq ? 'chosen' : ''} data-request-id=${r.request_id}
            data-status=${r.status} data-model=${r.model || ""} onClick=${() => setChosen(r)}>
          <td>${new Date(r.at * 1000).toLocaleString()}</td><td>${r.key_name || '–'}</td><td>${r.model || '–'}</td>
          <td>${r.method} ${r.path}</td><td><span class=${'pill s' + Math.floor(r.status / 100)}>${r.status}</span> ${r.error_code || ''}</td>
          <td>${Math.round(r.latency_ms)}</td><td>${(r.prompt_tokens || 0) + (r.completion_tokens || 0)}</td></tr>`)}</tbody>
      </table>
      ${chosen && html`<div class="detail"><h3>${t('callDetail')} <code>${chosen.request_id}</code></h3>
        <dl>${Object.entries(chosen).map(([k, v]) => html`<dt>${k}</dt><dd>${v === null ? '–' : typeof v === 'object' ? JSON.stringify(v) : String(v)}</dd>`)}</dl></div>`}
    </div>
  </section>`;
}
