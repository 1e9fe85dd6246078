// A copy button: writes the text to the clipboard and keeps it in data-copied (what tests and users can read
// back when the browser refuses clipboard access).
import { html, useState } from './vendor/htm-preact-standalone.js';
import { useT } from './i18n.js';

export function CopyButton({ text, label }) {
  const t = useT();
  const [copied, setCopied] = useState(false);
  const copy = async (event) => {
    const button = event.currentTarget;
    button.dataset.copied = text;
    document.body.dataset.lastCopied = text;
    try { await navigator.clipboard.writeText(text); } catch (_) { /* shown in data-copied all the same */ }
    setCopied(true);
    setTimeout(() => setCopied(false), 1500);
  };
  return html`<button type="button" class="copy" onClick=${copy} title=${text}>
    ${copied ? t('copied') : (label || t('copy'))}</button>`;
}
