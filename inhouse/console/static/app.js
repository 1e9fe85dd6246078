// The console's shell: the key bar (a pasted key kept in this tab's sessionStorage), the page tabs (#/page in
// the URL), the language toggle, and the models list the pages share.
import { html, render, useEffect, useState } from './vendor/htm-preact-standalone.js';
import { api, getKey, listModels, setKey } from './api.js';
import { LangContext, initialLanguage, rememberLanguage, translator } from './i18n.js';
import { Audit } from './pages/audit.js';
import { Dify } from './pages/dify.js';
import { Keys } from './pages/keys.js';
import { Models } from './pages/models.js';
import { Playground } from './pages/playground.js';

const PAGES = ['playground', 'models', 'keys', 'audit', 'dify'];
const ADMIN_PAGES = new Set(['keys', 'audit']);
const pageOf = () => { const p = location.hash.replace(/^#\/?/, ''); return PAGES.includes(p) ? p : 'playground'; };

function KeyBar({ t, session, onKey }) {
  const [draft, setDraft] = useState('');
  if (session.open) return html`<div class="keybar" data-open="true"><span class="hint">${t('authOff')}</span></div>`;
  if (session.key) {
    return html`<div class="keybar">
      <span>${t('signedIn')} <code>${session.key.slice(0, 7)}…</code></span>
      ${session.admin && html`<span class="pill admin">${t('adminBadge')}</span>`}
      <button type="button" name="forget" onClick=${() => onKey('')}>${t('forget')}</button></div>`;
  }
  return html`<form class="keybar" onSubmit=${(e) => { e.preventDefault(); onKey(draft.trim()); setDraft(''); }}>
    <input name="key" type="password" autocomplete="off" placeholder=${t('pasteKey')} value=${draft}
      onInput=${(e) => setDraft(e.target.value)}/>
    <button type="submit" class="primary" name="use-key">${t('useKey')}</button>
    <span class="hint">${t('keyHint')}</span></form>`;
}

function App() {
  const [lang, setLang] = useState(initialLanguage());
  const [page, setPage] = useState(pageOf());
  const [session, setSession] = useState({ key: getKey(), admin: false, models: [], error: '' });
  const t = translator(lang);

  const connect = async (key) => {
    setKey(key);
    if (!key) { setSession({ key: '', admin: false, models: [], error: '' }); return; }
    try {
      const models = await listModels();
      let admin = false;
      try { await api('/admin/models'); admin = true; } catch (_) { /* a key for applications */ }
      setSession({ key, admin, models, error: '' });
    } catch (err) {
      setKey('');
      setSession({ key: '', admin: false, models: [], error: `${t('badKey')}: ${err.message}` });
    }
  };
  const probeOpen = async () => {
    // a server with `auth: none` answers without a key: no key bar needed (asked of the console's own
    // server.json first, so a keyed server sees no refused call per page load)
    try {
      if ((await (await fetch('server.json')).json()).auth !== 'none') return;
      const models = await listModels();
      let admin = false;
      try { await api('/admin/models'); admin = true; } catch (_) { /* not an admin route here */ }
      setSession({ key: '', open: true, admin, models, error: '' });
    } catch (_) { /* keys are on: wait for one */ }
  };
  useEffect(() => { if (session.key) connect(session.key); else probeOpen(); }, []);
  useEffect(() => {
    const follow = () => setPage(pageOf());
    window.addEventListener('hashchange', follow);
    return () => window.removeEventListener('hashchange', follow);
  }, []);
  useEffect(() => { document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en'; document.title = t('title'); }, [lang]);
  const toggle = () => { const next = lang === 'zh' ? 'en' : 'zh'; rememberLanguage(next); setLang(next); };

  let body;
  if (!session.key && !session.open) body = html`<p class="empty">${t('needKey')}</p>`;
  else if (ADMIN_PAGES.has(page) && session.open) body = html`<p class="empty">${t('authOff')}</p>`;
  else if (ADMIN_PAGES.has(page) && !session.admin) body = html`<p class="empty">${t('adminOnly')}</p>`;
  else if (page === 'models') body = html`<${Models} admin=${session.admin}/>`;
  else if (page === 'keys') body = html`<${Keys}/>`;
  else if (page === 'audit') body = html`<${Audit}/>`;
  else if (page === 'dify') body = html`<${Dify} models=${session.models}/>`;
  else body = html`<${Playground} models=${session.models}/>`;

  return html`<${LangContext.Provider} value=${t}>
    <header>
      <h1>inhouse</h1>
      <nav>${PAGES.map((p) => html`<a href=${'#/' + p} class=${p === page ? 'active' : ''} data-page=${p}>${t(p)}</a>`)}</nav>
      <button type="button" class="lang" name="language" onClick=${toggle}>${t('language')}</button>
    </header>
    <${KeyBar} t=${t} session=${session} onKey=${connect}/>
    ${session.error && html`<div class="error">${session.error}</div>`}
    <main data-page=${page}>${body}</main>
  <//>`;
}

render(html`<${App}/>`, document.getElementById('app'));
