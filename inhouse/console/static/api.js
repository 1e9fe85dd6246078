// The console's one way to the server: the key pasted by the user (this tab's sessionStorage only), JSON calls
// that turn an OpenAI-shaped error into an ApiError, and an SSE reader for streamed chat completions.

const KEY = 'inhouse.console.key';

export const getKey = () => sessionStorage.getItem(KEY) || '';
export const setKey = (key) => (key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY));

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(json) {
  const h = {};
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  const error = body && body.error;
  return new ApiError(response.status, (error && error.message) || response.statusText || 'request failed',
                      error && error.code);
}

export async function api(path, { method = 'GET', body } = {}) {
  const response = await fetch(path, { method, headers: headers(body !== undefined),
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Yields each `data:` payload of an SSE response, parsed; stops at [DONE].
export async function* streamChat(body, signal) {
  const response = await fetch('/v1/chat/completions', { method: 'POST', headers: headers(true),
                                                          body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!block.startsWith('data: ')) continue;  // keep-alive comments
      const payload = block.slice(6);
      if (payload === '[DONE]') return;
      yield JSON.parse(payload);
    }
  }
}

// The caller's models (cards carry state, version, engine, capabilities, max_model_len).
export const listModels = async () => (await api('/v1/models')).data;
