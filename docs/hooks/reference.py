"""MkDocs hook: the CLI and configuration reference pages, generated from the code at every build.

* ``reference/cli.md`` walks the click command behind the typer app (``typer.main.get_command(synth7t.cli.app)``):
  every command, in the order ``synth7t --help`` lists them, with its help text, usage line and every argument and
  option (names, type, default, help).
* ``reference/config.md`` walks the pydantic models: :class:`synth7t.config.TrainConfig` (the keys of
  ``--set KEY=VALUE`` and of a preset YAML; one table per section, the model section per ``model.kind``) with
  each field's type, default, bounds and description (the field's ``description``, else the comment on or above
  its line in the source), the packaged presets (``synth7t/presets/*.yaml``: the keys each sets, and each file),
  and :class:`synth7t.preprocess.subject.PreprocessConfig`.

Nothing here is written by hand, so the reference cannot drift from the code; ``tests/core/test_docs.py`` checks
that every command, option and key appears. The functions are plain (``cli_markdown``, ``config_markdown``) so that
the test can call them without MkDocs.
"""

from __future__ import annotations

import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any

GENERATED = {
    "reference/cli.md": "cli_markdown",
    "reference/config.md": "config_markdown",
}


# ---------------------------------------------------------------------------------------------------------
# mkdocs hook


def on_files(files, config):
    """Add the generated pages to the site (MkDocs >= 1.6: ``File.generated``)."""
    from mkdocs.structure.files import File

    for path, fn in GENERATED.items():
        files.append(File.generated(config, path, content=globals()[fn]()))
    return files


# ---------------------------------------------------------------------------------------------------------
# markdown helpers

_SPECIAL = re.compile(r"([\\*_\[\]|#])")
_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def rst_roles(text: str) -> str:
    """Sphinx roles as code spans: ``:func:`~a.b.f``` -> ```f```, ``:class:`a.B``` -> ```a.B```."""
    return _ROLE.sub(lambda m: "`" + (m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)) + "`", text)


def md_text(text: str) -> str:
    """Help text or a docstring as Markdown: code spans (any number of backticks) kept, Sphinx roles turned into
    code spans, Markdown/HTML specials escaped elsewhere."""
    text = rst_roles(text or "")
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out.append(_escape(text[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_escape(text[pos:]))
    return "".join(out)


def _escape(text: str) -> str:
    text = _SPECIAL.sub(r"\\\1", text)
    text = re.sub(r"(^|\n)([ \t]*)\\\* ", r"\1\2* ", text)  # a list item stays one
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md_cell(text: str) -> str:
    """One table cell: escaped, on one line."""
    return " ".join(md_text(text).split())


def code_cell(value: Any) -> str:
    """A value as inline code in a table cell (``|`` escaped)."""
    text = value if isinstance(value, str) else repr(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text != "" else ""


def anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def section_anchor(key: str, cls, ns: str = "") -> str:
    """The heading id of a config section: ``model-<kind>`` for the model (one section per kind), else the key;
    ``ns`` (a namespace such as ``preprocess-``) keeps the ids of two configurations on one page apart."""
    kind = cls.model_fields.get("kind")
    if key == "model" and kind is not None:
        return f"{ns}model-{anchor(str(kind.default))}"
    return ns + (anchor(key) if key else "top-level")


# ---------------------------------------------------------------------------------------------------------
# CLI


def cli_commands():
    """``(name, click command)`` of every ``synth7t`` subcommand, in the order ``synth7t --help`` lists them."""
    import typer

    from synth7t.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="synth7t")
    return group, [(name, group.commands[name]) for name in group.list_commands(ctx)]


def _param_rows(command, ctx) -> list[str]:
    """One row per argument and option, as ``--help`` prints them (names with the value's type; help text with
    the default and ``[required]``)."""
    rows = ["| argument / option | description |", "|---|---|"]
    for p in command.params:
        if getattr(p, "hidden", False):
            continue
        record = p.get_help_record(ctx)  # typer's arguments have one too; click's plain ones do not
        names, help_text = record if record else (p.human_readable_name, getattr(p, "help", "") or "")
        rows.append(f"| {code_cell(names)} | {md_cell(help_text)} |")
    return rows


def cli_markdown() -> str:
    """The whole CLI reference page."""
    group, commands = cli_commands()
    root_ctx = group.context_class(group, info_name="synth7t")
    lines = [
        "# Command line reference",
        "",
        "Generated from the code at every build of this site (`docs/hooks/reference.py` walks the typer app of "
        "`synth7t/cli.py`): it is what `synth7t COMMAND --help` prints, as tables. Every command is a thin wrapper "
        "over one Python function of the same name (see the [Python API](api.md)).",
        "",
        "```text",
        "synth7t [GLOBAL OPTIONS] COMMAND [ARGS]...",
        "```",
        "",
        md_text(inspect.cleandoc(group.help or "")),
        "",
        "## Global options",
        "",
        "Given before the command (`synth7t -v train ...`).",
        "",
        *_param_rows(group, root_ctx),
        "",
        "## Commands",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name, cmd in commands:
        lines.append(f"| [`synth7t {name}`](#synth7t-{anchor(name)}) | {md_cell(cmd.get_short_help_str(limit=200))} |")
    for name, cmd in commands:
        ctx = cmd.context_class(cmd, info_name=name, parent=root_ctx)
        usage = " ".join(["synth7t", name, *cmd.collect_usage_pieces(ctx)])
        help_text = inspect.cleandoc(cmd.help or "")
        lines += [
            "",
            f"## `synth7t {name}` {{#synth7t-{anchor(name)}}}",
            "",
            "```text",
            usage,
            "```",
            "",
            *[md_text(par) if par.strip() else "" for par in help_text.split("\n")],
            "",
            *_param_rows(cmd, ctx),
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# configuration


def _is_model(tp: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _members(tp: Any) -> list[Any]:
    """The members of a (possibly Annotated, discriminated) union, unwrapped; ``[tp]`` for anything else."""
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [_unwrap(a) for a in typing.get_args(tp)]
    return [tp]


def model_sections(model, prefix: str = "") -> list[tuple[str, Any, bool]]:
    """``(dotted prefix, pydantic model class, optional)`` for ``model`` and every nested model, depth first."""
    out = [(prefix, model, False)]
    for name, field in model.model_fields.items():
        members = _members(field.annotation)
        sub = [m for m in members if _is_model(m)]
        optional = type(None) in members
        for m in sub:
            key = f"{prefix}{name}"
            for k, cls, opt in model_sections(m, key + "."):
                out.append((k, cls, opt or (optional and k == key + ".")))
    return out


def _type_name(tp: Any) -> str:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(code_cell(v if isinstance(v, str) else repr(v)) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return code_cell("null")
    if _is_model(tp):
        return "section"
    if origin is not None:
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _plain(a) for a in args)
        return code_cell(f"{getattr(origin, '__name__', str(origin))}[{inner}]")
    return code_cell(_plain(tp))


def _plain(tp: Any) -> str:
    tp = _unwrap(tp)
    if typing.get_origin(tp) is not None:
        args = ", ".join("..." if a is Ellipsis else _plain(a) for a in typing.get_args(tp))
        return f"{getattr(typing.get_origin(tp), '__name__', 'type')}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _bounds(field) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {getattr(m, attr)}")
    return ", ".join(out)


def source_comments(cls) -> dict[str, str]:
    """``{field: comment}``: the comment at the end of a field's line, or the comment lines right above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for i, line in enumerate(lines, start=1):
        m = re.match(r"\s+(\w+)\s*:", line)
        if not m or m.group(1) not in cls.model_fields:
            continue
        if i in comments and not line.lstrip().startswith("#"):
            out[m.group(1)] = comments[i]
            continue
        above, j = [], i - 1
        while j >= 1 and lines[j - 1].lstrip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        if above:
            out[m.group(1)] = " ".join(above)
    return out


def _default(field) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return ""
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "" if any(_is_model(m) for m in _members(field.annotation)) else code_cell(value.model_dump(mode="json"))
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return code_cell("null")
    if isinstance(value, bool):
        return code_cell(str(value).lower())
    return code_cell(value)


def section_table(cls, prefix: str, ns: str = "") -> list[str]:
    notes = source_comments(cls)
    rows = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        members = _members(field.annotation)
        if any(_is_model(m) for m in members):
            subs = ", ".join(f"[`{prefix}{name}`](#{section_anchor(prefix + name, m, ns)})"
                             + (f" (`kind: {m.model_fields['kind'].default}`)" if "kind" in m.model_fields else "")
                             for m in members if _is_model(m))
            desc = "section: " + subs + (" (`null`: none)" if type(None) in members else "")
            rows.append(f"| `{prefix}{name}` | section |  |  | {desc} |")
            continue
        desc = field.description or notes.get(name, "")
        if field.exclude:
            desc = (desc + " (not written to config.json)").strip()
        rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {_bounds(field)} | "
                    f"{md_cell(desc)} |")
    return rows


def config_sections(root) -> list[tuple[str, Any, bool]]:
    """Sections of ``root`` with the same prefix merged by model kind (``model`` has one per ``model.kind``)."""
    return model_sections(root)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def presets_markdown() -> list[str]:
    from importlib import resources

    from synth7t.config import PRESETS, preset_dict

    raw = {name: _flatten(preset_dict(name)) for name in PRESETS}
    keys = sorted({k for d in raw.values() for k in d if k != "preset"})
    lines = [
        "## Presets",
        "",
        "`--preset NAME` (or a YAML file of the same shape) starts from one of these; `--set KEY=VALUE` changes one "
        "key (`--set model.n_res=2`, `--set data.augment.gmm.enabled=false`). The table shows the keys each packaged "
        "preset sets (empty: the default above); each file follows, with the comments that say why.",
        "",
        "| key | " + " | ".join(f"`{p}`" for p in PRESETS) + " |",
        "|---|" + "---|" * len(PRESETS),
    ]
    for key in keys:
        cells = [code_cell(_yaml_value(raw[p][key])) if key in raw[p] else "" for p in PRESETS]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    for name in PRESETS:
        text = resources.files("synth7t.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        lines += ["", f'??? note "`{name}` (synth7t/presets/{name}.yaml)"', "", "    ```yaml",
                  *[("    " + line).rstrip() for line in text.rstrip().splitlines()], "    ```"]
    return lines


def _yaml_value(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def sections_markdown(root, ns: str = "") -> list[str]:
    """One heading, docstring and key table per section of the pydantic model ``root`` (nested ones included)."""
    lines, seen = [], set()
    for prefix, cls, optional in config_sections(root):
        if (prefix, cls) in seen:
            continue
        seen.add((prefix, cls))
        title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
        kind = cls.model_fields.get("kind")
        suffix = f" (`model.kind: {kind.default}`)" if prefix == "model." and kind is not None else ""
        lines += ["", f"### {title}{suffix} {{#{section_anchor(prefix.rstrip('.'), cls, ns)}}}", ""]
        if optional:
            lines += ["Optional section: `null` (the default) leaves it out.", ""]
        doc = inspect.cleandoc(cls.__doc__ or "") if cls.__doc__ and "Usage docs:" not in cls.__doc__ else ""
        if doc:
            lines += [md_text(doc), ""]
        lines += section_table(cls, prefix, ns)
    return lines


def config_markdown() -> str:
    """The whole configuration reference page."""
    from synth7t.config import TrainConfig
    from synth7t.preprocess.subject import PreprocessConfig

    lines = [
        "# Configuration reference",
        "",
        "Generated from the code at every build of this site (`docs/hooks/reference.py` walks the pydantic models "
        "of `synth7t/config.py` and `synth7t/preprocess/subject.py`, and reads `synth7t/presets/*.yaml`).",
        "",
        "A training run is described by one `TrainConfig`: a preset, changed key by key with `synth7t train ... "
        "--set KEY=VALUE` (values are read as YAML: `2`, `[1, 2]`, `null`, `true`), validated (an unknown key or a "
        "value out of bounds is a one-line error naming the key) and saved in the model folder as `config.json`.",
        "",
        "## Training configuration (`--set` keys)",
        *sections_markdown(TrainConfig),
        "",
        *presets_markdown(),
        "",
        "## Preprocessing settings (Python API) {#preprocess}",
        "",
        "`synth7t preprocess` sets these from its options; the Python API takes them as keyword arguments of "
        "`synth7t.preprocess.pipeline.preprocess(manifest, out, **settings)` or as a `PreprocessConfig`. The "
        "output-affecting ones are hashed into each subject's `.done`: a rerun with other values redoes the subject.",
        *sections_markdown(PreprocessConfig, ns="preprocess-"),
    ]
    return "\n".join(lines) + "\n"
