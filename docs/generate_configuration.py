"""Write docs/configuration.md from the config dataclasses and the comments on their fields.

    python docs/generate_configuration.py            # rewrite docs/configuration.md
    python docs/generate_configuration.py --check    # exit 1 when the file is out of date

brainseg_ray/config.py is the single source: this script reads the dataclasses (field names,
annotations as written, defaults) and the comments in their source, and hard-codes no field.
tests/test_docs.py fails when the committed file differs from what this writes.

How comments become the "meaning" column:

* a comment on a field's own line(s) is that field's meaning;
* a block of comment lines directly above a field is its meaning, unless the field also has a
  comment on its own line, or the block is one line of the form `# word` or `# word: text`, or a
  blank line separates it from the field: then the block is a heading for the fields below it and
  becomes a row of its own.

Nested dataclasses (`s3: S3Options`) are expanded into dotted names (`s3.endpoint_url`), the form
`key=value` overrides and YAML sections use; each nested class also gets a section of its own.
Imports nothing heavier than the config module itself (yaml, fsspec): no Ray, no torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import re
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = "python docs/generate_configuration.py"

# Which commands take which settings class. Class names only, never fields; a name here that
# config.py no longer defines is an error, so this cannot go stale quietly.
USED_BY = {
    "IngestConfig": "`brainseg ingest`, `jobs/ingest.py`",
    "TrainConfig": "`brainseg train`, `jobs/train.py` (`jobs/train.yaml` is an example file)",
    "LrFindConfig": "`brainseg lr-find`",
    "EvaluateConfig": "`brainseg evaluate`, `jobs/evaluate.py`",
    "SegmentJobConfig": "`brainseg segment`, `jobs/segment_archive.py`",
    "ServeConfig": "`brainseg serve`, and the application `args` of `serve_config.yaml` (`serve run`, "
                   "`serve deploy`) and `k8s/rayservice.yaml`",
    "SynthConfig": "`brainseg synth`",
}


@dataclasses.dataclass
class FieldDoc:
    annotation: str  # as written in the source
    meaning: str  # the field's comment, "" when it has none
    heading: str  # a heading comment that sits above this field, "" when none


def _clean(lines: list[str]) -> str:
    return " ".join(line.strip() for line in lines if line.strip())


def _is_heading(block: list[str]) -> bool:
    return len(block) == 1 and re.fullmatch(r"[\w-]+(:.*)?", block[0].strip()) is not None


def field_docs(cls: type) -> dict[str, FieldDoc]:
    """The annotation, meaning and heading of each field of `cls`, read from its module's source."""
    path = inspect.getsourcefile(cls)
    source = Path(path).read_text(encoding="utf-8")
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number -> comment text, without the '#'
    own_line: set[int] = set()  # lines holding nothing but a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string[1:].strip()
            if tok.line.strip().startswith("#"):
                own_line.add(tok.start[0])
    node = next((n for n in ast.walk(ast.parse(source))
                 if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None)
    if node is None:
        raise LookupError(f"class {cls.__name__} not found in {path}")
    docs: dict[str, FieldDoc] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1)
                    if n in comments and n not in own_line]
        above: list[str] = []
        n = stmt.lineno - 1
        while n >= 1 and n in own_line:
            above.insert(0, comments[n])
            n -= 1
        separated: list[str] = []
        if not above:  # a comment block, then blank lines, then the field: a heading
            m = n
            while m >= 1 and not lines[m - 1].strip():
                m -= 1
            if m < n:
                while m >= 1 and m in own_line:
                    separated.insert(0, comments[m])
                    m -= 1
        if above and not trailing and not _is_heading(above):
            meaning, heading = _clean(above), ""
        else:
            meaning, heading = _clean(trailing), _clean(above or separated)
        annotation = ast.get_source_segment(source, stmt.annotation) or ""
        docs[stmt.target.id] = FieldDoc(annotation, meaning, heading)
    return docs


def format_value(value: object) -> str:
    """A default as it would be written in a YAML config or a key=value override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text else text


def rows(cls: type, instance: object, prefix: str = "") -> list[str]:
    """Table rows for the fields of `cls` (nested dataclasses expanded with dotted names)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        doc = docs.get(f.name, FieldDoc(str(f.type), "", ""))
        if doc.heading:
            out.append(f"| **{_cell(doc.heading)}** | | | |")
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints.get(f.name)) and dataclasses.is_dataclass(value):
            nested = hints[f.name]
            link = f"[{nested.__name__}](#{nested.__name__.lower()})"
            note = f"{doc.meaning}; " if doc.meaning else ""
            out.append(f"| {_cell(prefix + f.name + '.*', code=True)} | {link} | | {_cell(note)}the rows below |")
            out.extend(rows(nested, value, prefix=f"{prefix}{f.name}."))
            continue
        out.append(f"| {_cell(prefix + f.name, code=True)} | {_cell(doc.annotation, code=True)} | "
                   f"{_cell(format_value(value), code=True)} | {_cell(doc.meaning)} |")
    return out


def settings_classes(module) -> list[type]:
    """The module's dataclasses in source order, then the dataclasses they nest from elsewhere."""
    own = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
           if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__]
    own.sort(key=lambda c: inspect.getsourcelines(c)[1])
    found = list(own)
    for cls in found:  # grows while it is walked: breadth-first over nested types
        for hint in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(hint) and hint not in found:
                found.append(hint)
    return found


def nested_in(classes: list[type]) -> dict[type, list[str]]:
    """For each class, the `Parent.field` places it is nested at."""
    places: dict[type, list[str]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls).get(f.name)
            if dataclasses.is_dataclass(hint):
                places.setdefault(hint, []).append(
                    f"[{cls.__name__}](#{cls.__name__.lower()}) (`{f.name}.*`)")
    return places


def render() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from brainseg_ray import config

    if ROOT not in Path(config.__file__).resolve().parents:
        raise ImportError(f"brainseg_ray is imported from {config.__file__}, not from this checkout ({ROOT})")
    classes = settings_classes(config)
    names = {c.__name__ for c in classes}
    missing = sorted(set(USED_BY) - names)
    if missing:
        raise LookupError(f"USED_BY in {Path(__file__).name} names classes config.py no longer has: {missing}")
    places = nested_in(classes)
    source = Path(inspect.getsourcefile(config)).relative_to(ROOT).as_posix()
    out = [
        "# Configuration",
        "",
        f"<!-- Generated by `{COMMAND}` from the dataclasses in {source} and the comments on their "
        "fields. Do not edit: change config.py and regenerate; tests/test_docs.py fails when this "
        "file is out of date. -->",
        "",
        inspect.getdoc(config) or "",
        "",
        f"Order of precedence ({source}, `load_config`): {inspect.getdoc(config.load_config)}",
        "",
        "    brainseg ingest SRC --out DST slices_per_task=64 s3.region=eu-west-1 ray.num_cpus=4",
        "    brainseg train --config jobs/train.yaml num_workers=4 lr=3e-4",
        "",
        "The YAML file is given with `--config FILE` (a local path or an `s3://` URI) and holds the same "
        "names, nested settings as sections. An unknown or mistyped setting is an error that names it. "
        "Defaults are shown as they are written in YAML or after `key=value`: `null` is Python's `None`, "
        "which the comments name.",
        "",
        "| settings | used by |",
        "| --- | --- |",
    ]
    for cls in classes:
        used = USED_BY.get(cls.__name__) or ("inside " + ", ".join(places[cls]) if cls in places else "")
        out.append(f"| [{cls.__name__}](#{cls.__name__.lower()}) | {used} |")
    for cls in classes:
        out += ["", f"## {cls.__name__}", ""]
        where = inspect.getsourcefile(cls)
        out.append(f"Defined in `{Path(where).relative_to(ROOT).as_posix()}`.")
        doc = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        if doc:
            out.append(inspect.cleandoc(doc))
        if cls.__name__ in USED_BY:
            out.append(f"Used by {USED_BY[cls.__name__]}.")
        if cls in places:
            out.append("Nested in " + ", ".join(places[cls]) + ".")
        out += ["", "| setting | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += rows(cls, cls())
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
    if args.check:
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       "docs/configuration.md", "generated"))
            print(f"docs/configuration.md is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        OUTPUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
