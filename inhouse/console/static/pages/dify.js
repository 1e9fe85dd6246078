// Connect Dify: for each model, the exact values to type into Dify's "OpenAI-API-compatible" provider form
// (LLM, Text Embedding or Rerank), each with a copy button, and the pitfalls those values avoid.
// Field names are Dify's own labels (model_credential_schema of the official plugin); their defaults
// (context 4096, no function calling, no vision) are wrong for most local models, hence this page.
import { html, useState } from '../vendor/htm-preact-standalone.js';
import { CopyButton } from '../copy.js';
import { useT } from '../i18n.js';

const yes = (flag, on, off) => (flag ? on : off);

export function difyForms(model, base) {
  const caps = new Set(model.capabilities || []);
  const url = `${base.replace(/\/+$/, '')}/v1`;
  const context = String(model.max_model_len || '');
  const forms = [];
  if (caps.has('chat') || caps.has('completion')) {
    forms.push({ type: 'LLM', fields: [
      ['Model Name', model.id], ['API endpoint URL', url],
      ['Completion mode', caps.has('chat') ? 'Chat' : 'Completion'],
      ['Model context size', context], ['Upper bound for max tokens', context],
      ['Function calling', yes(caps.has('tools'), 'Tool Call', 'Not Support')],
      ['Stream function calling', yes(caps.has('tools'), 'Support', 'Not Support')],
      ['Vision Support', yes(caps.has('vision'), 'Support', 'Not Support')],
      ['Structured Output', yes(caps.has('json_schema'), 'Support', 'Not Support')],
      ['Delimiter for streaming results', '\\n\\n'],
    ] });
  }
  if (caps.has('embeddings')) {
    forms.push({ type: 'Text Embedding', fields: [
      ['Model Name', model.id], ['API endpoint URL', url], ['Model context size', context], ['Max chunks', '1'],
    ] });
  }
  if (caps.has('rerank')) {
    forms.push({ type: 'Rerank', fields: [
      ['Model Name', model.id], ['API endpoint URL', url], ['Model context size', context],
    ] });
  }
  return forms;
}

const PITFALLS = ['pitHost', 'pitV1', 'pitContext', 'pitMaxTokens', 'pitTools', 'pitVision', 'pitUsage',
                  'pitEmbeddings', 'pitRerank', 'pitKey'];

export function Dify({ models }) {
  const t = useT();
  const local = /^(localhost|127\.|\[::1\])/.test(location.hostname);
  const [base, setBase] = useState(location.origin);
  return html`<section class="page dify">
    <p>${t('difyIntro')}</p>
    <label class="wide">${t('difyBase')}<input name="base" value=${base} onInput=${(e) => setBase(e.target.value)}/></label>
    ${local && html`<p class="warn">${t('difyLocalhost')}</p>`}
    <p>API Key: ${t('difyKey')}</p>
    ${models.map((m) => difyForms(m, base).map((form) => html`<div class="dify-form" data-model=${m.id} data-type=${form.type}>
      <h3>${m.id} <span class="tag">${form.type}</span></h3>
      <table class="fields">${form.fields.map(([label, value]) => html`<tr data-field=${label}>
        <th>${label}${t('dify:' + label) !== 'dify:' + label ? html`<small> ${t('dify:' + label)}</small>` : ''}</th>
        <td><code class="value">${value}</code></td><td><${CopyButton} text=${value}/></td></tr>`)}</table>
    </div>`))}
    <h3>${t('pitfalls')}</h3>
    <ul class="pitfalls">${PITFALLS.map((p) => html`<li>${t(p)}</li>`)}</ul>
  </section>`;
}
