// The playground's request as a shell command and as Python (the openai SDK), ready to copy.  The key is never
// written into them: both read INHOUSE_API_KEY from the environment.

export function curlSnippet(origin, body) {
  const json = JSON.stringify(body, null, 2).replaceAll("'", "'\\''");
  return `curl -N ${origin}/v1/chat/completions \\
  -H "Authorization: Bearer $INHOUSE_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '${json}'`;
}

function py(value, indent) {
  // JSON → Python literal (true/false/null → True/False/None), indented for the call's keyword arguments
  const text = JSON.stringify(value, null, 4)
    .replace(/("(?:[^"\\]|\\.)*")|\btrue\b|\bfalse\b|\bnull\b/g,
             (m, str) => str || ({ true: 'True', false: 'False', null: 'None' })[m]);
  return text.split('\n').join('\n' + ' '.repeat(indent));
}

export function pythonSnippet(origin, body) {
  const { model, messages, stream, stream_options: _, ...rest } = body;
  const extra = Object.entries(rest).map(([k, v]) => `    ${k}=${py(v, 4)},\n`).join('');
  return `import os
from openai import OpenAI

client = OpenAI(base_url="${origin}/v1", api_key=os.environ["INHOUSE_API_KEY"])
stream = client.chat.completions.create(
    model=${JSON.stringify(model)},
    messages=${py(messages, 4)},
${extra}    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
`;
}
