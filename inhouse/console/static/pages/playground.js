// Playground: pick a model, a system prompt and parameters; chat with streaming output; TTFT and tokens/s per
// answer; tool calls and reasoning shown as such; the same request as curl and Python.
import { html, useEffect, useRef, useState } from '../vendor/htm-preact-standalone.js';
import { streamChat } from '../api.js';
import { CopyButton } from '../copy.js';
import { useT } from '../i18n.js';
import { curlSnippet, pythonSnippet } from '../snippets.js';

const chatModels = (models) => models.filter((m) => (m.capabilities || []).includes('chat'));

function requestBody(settings, history) {
  const messages = [];
  if (settings.system.trim()) messages.push({ role: 'system', content: settings.system });
  for (const m of history) {
    if (m.role === 'user') messages.push({ role: 'user', content: m.content });
    else if (m.tool_calls && m.tool_calls.length) {
      messages.push({ role: 'assistant', content: m.content || null, tool_calls: m.tool_calls });
    } else messages.push({ role: 'assistant', content: m.content });
  }
  const body = { model: settings.model, messages, stream: true, stream_options: { include_usage: true },
                 temperature: Number(settings.temperature), top_p: Number(settings.top_p),
                 max_tokens: Number(settings.max_tokens) };
  if (settings.tools.trim()) body.tools = JSON.parse(settings.tools);
  return body;
}

function mergeToolCall(calls, delta) {
  const index = delta.index ?? calls.length;
  const call = calls[index] || (calls[index] = { id: '', type: 'function', function: { name: '', arguments: '' } });
  if (delta.id) call.id = delta.id;
  if (delta.function) {
    if (delta.function.name) call.function.name += delta.function.name;
    if (delta.function.arguments) call.function.arguments += delta.function.arguments;
  }
}

function Answer({ m }) {
  const t = useT();
  if (m.role === 'user') return html`<div class="msg user" data-role="user"><b>${t('you')}</b><div>${m.content}</div></div>`;
  return html`<div class="msg assistant" data-role="assistant" data-state=${m.state}>
    <b>${t('assistant')}</b>
    ${m.reasoning && html`<details class="reasoning" open><summary>${t('reasoning')}</summary><pre>${m.reasoning}</pre></details>`}
    <div class="content">${m.content}</div>
    ${(m.tool_calls || []).map((c) => html`<div class="toolcall"><span class="tag">${t('toolCall')}</span>
      <code>${c.function.name}(${c.function.arguments})</code></div>`)}
    ${m.error && html`<div class="error">${m.error}</div>`}
    ${m.stats && html`<div class="stats" data-ttft=${m.stats.ttft} data-tps=${m.stats.tps}>
      TTFT ${m.stats.ttft} ms · ${m.stats.tps} ${t('tokPerS')} · ${m.stats.tokens} ${t('tokens')}
      ${m.finish ? ` · ${m.finish}` : ''}</div>`}
  </div>`;
}

export function Playground({ models }) {
  const t = useT();
  const options = chatModels(models);
  const [settings, setSettings] = useState({ model: '', system: '', temperature: 0.7, top_p: 1, max_tokens: 256,
                                             tools: '' });
  const [history, setHistory] = useState([]);
  const [input, setInput] = useState('');
  const [busy, setBusy] = useState(false);
  const [problem, setProblem] = useState('');
  const abort = useRef(null);
  useEffect(() => {
    if (!settings.model && options.length) setSettings((s) => ({ ...s, model: options[0].id }));
  }, [models]);
  const set = (field) => (e) => setSettings({ ...settings, [field]: e.target.value });

  // the request Send makes with what is typed; with nothing typed, the last request sent (or a greeting)
  const sent = history.length && history[history.length - 1].role === 'assistant' ? history.slice(0, -1) : history;
  const next = input.trim() ? [...history, { role: 'user', content: input }]
    : sent.length ? sent : [{ role: 'user', content: 'Hello!' }];
  let preview = null;
  try { preview = requestBody(settings, next); } catch (_) { /* tools are not valid JSON yet */ }

  const send = async (e) => {
    e.preventDefault();
    if (!input.trim() || busy) return;
    let body;
    try { body = requestBody(settings, [...history, { role: 'user', content: input }]); } catch (err) {
      setProblem(`${t('toolsInvalid')}: ${err.message}`);
      return;
    }
    setProblem('');
    const answer = { role: 'assistant', content: '', reasoning: '', tool_calls: [], state: 'waiting' };
    const shown = [...history, { role: 'user', content: input }];
    const update = () => setHistory([...shown, { ...answer }]);
    update();
    setInput('');
    setBusy(true);
    abort.current = new AbortController();
    const started = performance.now();
    let first = null;
    let usage = null;
    try {
      for await (const chunk of streamChat(body, abort.current.signal)) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          const reasoning = d.reasoning_content || d.reasoning;
          if (d.content || reasoning || d.tool_calls) {
            if (first === null) first = performance.now();
            answer.state = 'streaming';
          }
          if (d.content) answer.content += d.content;
          if (reasoning) answer.reasoning += reasoning;
          for (const call of d.tool_calls || []) mergeToolCall(answer.tool_calls, call);
          if (choice.finish_reason) answer.finish = choice.finish_reason;
        }
        update();
      }
    } catch (err) {
      answer.error = err.name === 'AbortError' ? t('stopped') : err.message;
    }
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : 0;
    // decode speed from the first token to the end; an answer that came in one piece: over the whole call
    const decoding = first === null ? 0 : (ended - first) / 1000;
    const seconds = decoding >= 0.05 ? decoding : (ended - started) / 1000;
    answer.stats = { ttft: first === null ? '–' : Math.round(first - started), tokens,
                     tps: seconds > 0 && tokens ? (tokens / seconds).toFixed(1) : '–' };
    answer.state = 'done';
    update();
    setBusy(false);
  };

  return html`<section class="page playground">
    <form class="settings" onSubmit=${(e) => e.preventDefault()}>
      <label>${t('model')}<select name="model" value=${settings.model} onChange=${set('model')}>
        ${options.map((m) => html`<option value=${m.id}>${m.id}</option>`)}</select></label>
      <label>${t('systemPrompt')}<textarea name="system" rows="3" value=${settings.system} onInput=${set('system')}></textarea></label>
      <label>temperature<input name="temperature" type="number" step="0.1" min="0" max="2" value=${settings.temperature} onInput=${set('temperature')}/></label>
      <label>top_p<input name="top_p" type="number" step="0.05" min="0" max="1" value=${settings.top_p} onInput=${set('top_p')}/></label>
      <label>max_tokens<input name="max_tokens" type="number" min="1" value=${settings.max_tokens} onInput=${set('max_tokens')}/></label>
      <label>${t('toolsJson')}<textarea name="tools" rows="3" placeholder='[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]' value=${settings.tools} onInput=${set('tools')}></textarea></label>
      <button type="button" onClick=${() => setHistory([])}>${t('clearChat')}</button>
    </form>
    <div class="chat">
      <div class="messages">${history.map((m) => html`<${Answer} m=${m}/>`)}</div>
      ${problem && html`<div class="error">${problem}</div>`}
      <form class="composer" onSubmit=${send}>
        <textarea name="prompt" rows="2" placeholder=${t('typeMessage')} value=${input}
          onInput=${(e) => setInput(e.target.value)}
          onKeyDown=${(e) => { if (e.key === 'Enter' && !e.shiftKey) send(e); }}></textarea>
        ${busy ? html`<button type="button" onClick=${() => abort.current.abort()}>${t('stop')}</button>`
               : html`<button type="submit" class="primary" name="send">${t('send')}</button>`}
      </form>
      ${preview && html`<div class="snippets">
        <div class="snippet"><div class="bar"><b>curl</b><${CopyButton} text=${curlSnippet(location.origin, preview)}/></div>
          <pre class="code" data-lang="curl">${curlSnippet(location.origin, preview)}</pre></div>
        <div class="snippet"><div class="bar"><b>Python (openai)</b><${CopyButton} text=${pythonSnippet(location.origin, preview)}/></div>
          <pre class="code" data-lang="python">${pythonSnippet(location.origin, preview)}</pre></div>
      </div>`}
    </div>
  </section>`;
}
