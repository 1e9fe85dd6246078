// English and Chinese text of the console.  The language comes from the toggle (kept in this tab's
// sessionStorage), else from the browser's language.  A missing string shows its English text.
import { createContext, useContext } from './vendor/htm-preact-standalone.js';

const LANG = 'inhouse.console.lang';

const en = {
  title: 'inhouse console', playground: 'Playground', models: 'Models', keys: 'Keys', audit: 'Audit',
  dify: 'Connect Dify', pasteKey: 'Paste an API key (ih-…)', useKey: 'Use key', forget: 'Forget key',
  keyHint: 'The key stays in this tab only (session storage) and is sent only to this server.',
  signedIn: 'Key', adminBadge: 'admin', badKey: 'This key was refused', needKey: 'Paste a key to start.',
  adminOnly: 'This page needs an admin key.',
  authOff: 'This server runs without keys (auth: none): every call is open, and there are no keys or audit log to manage.',
  copy: 'Copy', copied: 'Copied', you: 'You', assistant: 'Assistant', reasoning: 'Reasoning',
  toolCall: 'tool call', tokPerS: 'tok/s', tokens: 'tokens', stopped: 'stopped', model: 'Model',
  systemPrompt: 'System prompt', toolsJson: 'Tools (JSON, optional)', clearChat: 'Clear chat',
  typeMessage: 'Type a message; Enter sends, Shift+Enter is a new line', send: 'Send', stop: 'Stop',
  toolsInvalid: 'Tools are not valid JSON',
  secretOnce: 'copy this secret now: it is shown once and never again.', dismiss: 'Done',
  createKey: 'Create a key', name: 'Name', adminKey: 'Admin key', modelsAllowed: 'Models (comma-separated)',
  allModels: 'all models', maxConcurrency: 'Max concurrency', tokenBudget: 'Token budget',
  budgetPeriod: 'Budget period', day: 'day', month: 'month', create: 'Create', prefix: 'Prefix', status: 'Status',
  limits: 'Limits', budgetUsage: 'Usage / budget', created: 'Created', rotate: 'Rotate', revoke: 'Revoke',
  active: 'active', revoked: 'revoked', expired: 'expired', all: 'all', none: 'none', concurrent: 'concurrent',
  per_day: 'today', per_month: 'this month',
  key: 'Key', keyIdOrName: 'id or name', since: 'Since', until: 'Until', limit: 'Limit', search: 'Search',
  hideReads: 'Hide reads (GET)', verifyChain: 'Verify chain', export: 'Export', chainOk: 'Hash chain intact',
  chainBroken: 'Hash chain BROKEN', rows: 'rows', time: 'Time', path: 'Call', callDetail: 'Call',
  state: 'State', health: 'Healthy', version: 'Version', engine: 'Engine', context: 'Context',
  capabilities: 'Capabilities', reqPerS: 'req/s', errorRate: 'Errors', actions: 'Actions',
  reloadConfig: 'Reload config', newPath: 'new path', canaryPct: 'canary %', canary: 'Canary', swap: 'Swap', canaryWindow: 'window s', swapping: 'Swapping…',
  rollback: 'Rollback', circuit: 'circuit', loading: 'loading', ready: 'ready', draining: 'draining',
  failed: 'failed', unhealthy: 'unhealthy', inFlight: 'in flight',
  modelsHint: 'Rates, TTFT and error share (5xx) are over the last 5 s (over the server\'s life until two reads exist), from /metrics/models.',
  difyIntro: 'In Dify: Settings → Model Provider → OpenAI-API-compatible → Add Model. Type these values; leave the other fields at their defaults.',
  difyBase: 'This server as Dify\'s plugin daemon reaches it',
  difyLocalhost: 'You opened the console on localhost: Dify runs in its own containers, where localhost is the container itself. Put the host name or address Dify can reach above.',
  difyKey: 'a key made for Dify on the Keys page (one per application), not an admin key.',
  pitfalls: 'Pitfalls these values avoid',
  pitHost: 'The URL must be reachable from Dify\'s plugin daemon container, not from your browser: never localhost.',
  pitV1: 'Dify adds nothing to the URL: type it with /v1 (inhouse serves both, but other tools expect /v1), and never with /chat/completions or a query string.',
  pitContext: 'Dify\'s default context size is 4096 whatever the model: use the model\'s own window so Dify neither overfills it nor cuts prompts short.',
  pitMaxTokens: 'Dify never shrinks max_tokens: prompt + max_tokens beyond the context is refused with a 400 that says by how much. Keep the app\'s max tokens below the context minus the prompt.',
  pitTools: 'Function calling defaults to "Not Support", which hides the model from Dify\'s agents: choose Tool Call (and stream function calling) for models that list tools.',
  pitVision: 'Vision Support is off by default; turn it on only for models that list vision, or Dify sends images the model cannot read.',
  pitUsage: 'inhouse puts usage on every stream, so an air-gapped Dify never tries to download a tokenizer to count tokens.',
  pitEmbeddings: 'Embeddings: add the model as a Text Embedding model of the same provider, same URL and key; vectors are floats (Dify cannot read base64) and an empty chunk is a 400, not a zero vector.',
  pitRerank: 'Rerank scores are in [0, 1], so Dify\'s score threshold means something.',
  pitKey: 'Give Dify its own key (and model list and limits), so its calls are audited and can be revoked alone.',
  language: '中文',
};

const zh = {
  title: 'inhouse 控制台', playground: '调试台', models: '模型', keys: '密钥', audit: '审计',
  dify: '接入 Dify', pasteKey: '粘贴 API 密钥（ih-…）', useKey: '使用密钥', forget: '清除密钥',
  keyHint: '密钥只保存在本标签页（session storage），只发送到本服务器。',
  signedIn: '密钥', adminBadge: '管理员', badKey: '该密钥被拒绝', needKey: '请先粘贴密钥。',
  adminOnly: '此页面需要管理员密钥。',
  authOff: '本服务器未启用密钥（auth: none）：所有调用都开放，没有可管理的密钥和审计日志。',
  copy: '复制', copied: '已复制', you: '你', assistant: '助手', reasoning: '推理过程', toolCall: '工具调用',
  tokPerS: 'token/秒', tokens: 'token', stopped: '已停止', model: '模型', systemPrompt: '系统提示词',
  toolsJson: '工具（JSON，可选）', clearChat: '清空对话', typeMessage: '输入消息；回车发送，Shift+回车换行',
  send: '发送', stop: '停止', toolsInvalid: '工具不是有效的 JSON',
  secretOnce: '请立即复制此密钥：它只显示这一次。', dismiss: '完成',
  createKey: '创建密钥', name: '名称', adminKey: '管理员密钥', modelsAllowed: '可用模型（逗号分隔）',
  allModels: '全部模型', maxConcurrency: '最大并发', tokenBudget: 'Token 预算', budgetPeriod: '预算周期',
  day: '天', month: '月', create: '创建', prefix: '前缀', status: '状态', limits: '限额',
  budgetUsage: '用量 / 预算', created: '创建时间', rotate: '轮换', revoke: '吊销', active: '有效',
  revoked: '已吊销', expired: '已过期', all: '全部', none: '无', concurrent: '并发', per_day: '今日',
  per_month: '本月',
  key: '密钥', keyIdOrName: 'id 或名称', since: '起始', until: '截止', limit: '条数', search: '查询',
  hideReads: '隐藏读取（GET）', verifyChain: '校验哈希链', export: '导出', chainOk: '哈希链完整', chainBroken: '哈希链已损坏', rows: '行',
  time: '时间', path: '调用', callDetail: '调用详情',
  state: '状态', health: '健康', version: '版本', engine: '引擎', context: '上下文', capabilities: '能力',
  reqPerS: '请求/秒', errorRate: '错误率', actions: '操作', reloadConfig: '重新加载配置', newPath: '新路径',
  canaryPct: '金丝雀 %', canary: '金丝雀发布', swap: '切换', canaryWindow: '观察秒数', swapping: '切换中…', rollback: '回滚', circuit: '熔断',
  loading: '加载中', ready: '就绪', draining: '排空中', failed: '失败', unhealthy: '不健康', inFlight: '处理中',
  modelsHint: '请求速率、TTFT 与错误率（5xx）为最近 5 秒的数值（不足两次读取时为服务器启动以来），来自 /metrics/models。',
  difyIntro: '在 Dify 中：设置 → 模型供应商 → OpenAI-API-compatible → 添加模型。填写以下值，其他字段保持默认。',
  difyBase: 'Dify 插件守护进程访问本服务器的地址',
  difyLocalhost: '你是在 localhost 上打开的控制台：Dify 运行在自己的容器里，那里的 localhost 是容器本身。请在上面填写 Dify 能访问到的主机名或地址。',
  difyKey: '在"密钥"页为 Dify 单独创建的密钥（每个应用一个），不要用管理员密钥。',
  pitfalls: '这些取值避免的问题',
  pitHost: 'URL 必须能从 Dify 的插件守护进程容器访问，而不是从你的浏览器：不要用 localhost。',
  pitV1: 'Dify 不会给 URL 添加任何内容：请带上 /v1（inhouse 两种都支持，但其他工具需要 /v1），不要带 /chat/completions 或查询参数。',
  pitContext: 'Dify 默认上下文长度一律为 4096：请填写模型自己的窗口，避免超出或过早截断提示词。',
  pitMaxTokens: 'Dify 不会自动缩小 max_tokens：提示词 + max_tokens 超出上下文时返回 400 并说明超出多少。请让应用的最大 token 数小于上下文减去提示词。',
  pitTools: '函数调用默认为 "Not Support"，Dify 的 Agent 将无法使用该模型：能力中有 tools 的模型请选择 Tool Call（以及流式函数调用）。',
  pitVision: '视觉支持默认关闭；只对能力中有 vision 的模型开启，否则 Dify 会发送模型无法读取的图片。',
  pitUsage: 'inhouse 在每个流式响应中都带有 usage，离线环境中的 Dify 不会尝试下载分词器来计数。',
  pitEmbeddings: '向量：把模型作为同一供应商的 Text Embedding 模型添加，URL 和密钥相同；向量为浮点数（Dify 无法读取 base64），空文本返回 400 而不是零向量。',
  pitRerank: '重排分数在 [0, 1] 之间，Dify 的分数阈值才有意义。',
  pitKey: '给 Dify 单独的密钥（及模型范围和限额），它的调用可单独审计和吊销。',
  language: 'English',
  'dify:Model Name': '模型名称', 'dify:API endpoint URL': 'API 端点 URL', 'dify:Completion mode': '对话模式',
  'dify:Model context size': '模型上下文长度', 'dify:Upper bound for max tokens': '最大 token 上限',
  'dify:Function calling': '函数调用', 'dify:Stream function calling': '流式函数调用',
  'dify:Vision Support': '视觉支持', 'dify:Structured Output': '结构化输出',
  'dify:Delimiter for streaming results': '流式结果分隔符', 'dify:Max chunks': '最大分块数',
};

export const STRINGS = { en, zh };

export function initialLanguage() {
  const chosen = sessionStorage.getItem(LANG);
  if (chosen === 'en' || chosen === 'zh') return chosen;
  return (navigator.language || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en';
}

export const rememberLanguage = (lang) => sessionStorage.setItem(LANG, lang);

export function translator(lang) {
  const table = STRINGS[lang] || en;
  return (key) => table[key] ?? en[key] ?? key;
}

export const LangContext = createContext(translator('en'));
export const useT = () => useContext(LangContext);
