"""The documentation: configuration.md generated from the config dataclasses and current, a short
README, relative links that resolve, and no absolute paths of the machine that wrote a page.

Fast and light: imports brainseg_ray.config (yaml, fsspec) and the generator, never Ray or torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 200


def _generator():
    """docs/generate_configuration.py, imported from its path (docs/ is no package)."""
    return load_script(DOCS / "generate_configuration.py")


def test_configuration_md_is_what_the_generator_writes():
    gen = _generator()
    expected = gen.render()
    current = (DOCS / "configuration.md").read_text(encoding="utf-8")
    if current != expected:
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                                 "docs/configuration.md", "generated"))[:60])
        pytest.fail(f"docs/configuration.md is out of date with the config dataclasses: run "
                    f"`{gen.COMMAND}` (e.g. `.venv/bin/python docs/generate_configuration.py`) and commit "
                    f"the result.\n{diff}")


def test_every_setting_of_every_config_class_is_documented():
    from brainseg_ray import config

    gen = _generator()
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    classes = gen.settings_classes(config)
    assert {"TrainConfig", "S3Options"} <= {c.__name__ for c in classes}
    for cls in classes:
        assert f"\n## {cls.__name__}\n" in text, cls.__name__
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text or f"| `{f.name}.*` |" in text, f"{cls.__name__}.{f.name}"


def test_generator_reads_comments_headings_and_nested_defaults(tmp_path, monkeypatch):
    (tmp_path / "sample_settings.py").write_text('''
from __future__ import annotations
from dataclasses import dataclass, field


@dataclass
class Inner:
    """Inner settings."""

    url: str | None = None  # where | how
    # A block above a field without a comment of its own
    # is that field's meaning.
    level: int = 1


@dataclass
class Outer:
    name: str = "x"  # trailing comment
    # resources
    workers: int = 2
    # A heading over the fields below.
    first: bool = True  # its own comment
    plain: float = 0.5
    inner: Inner = field(default_factory=lambda: Inner(level=3))
    items: list[str] = field(default_factory=list)
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    import sample_settings

    gen = _generator()
    docs = gen.field_docs(sample_settings.Outer)
    assert docs["name"].meaning == "trailing comment"
    assert (docs["workers"].heading, docs["workers"].meaning) == ("resources", "")
    assert (docs["first"].heading, docs["first"].meaning) == ("A heading over the fields below.", "its own comment")
    assert docs["plain"] == gen.FieldDoc("float", "", "")
    assert gen.field_docs(sample_settings.Inner)["level"].meaning == (
        "A block above a field without a comment of its own is that field's meaning.")
    rows = gen.rows(sample_settings.Outer, sample_settings.Outer())
    assert "| `inner.url` | `str \\| None` | `null` | where \\| how |" in rows
    assert "| `inner.level` | `int` | `3` | A block above a field without a comment of its own is that field's meaning. |" in rows
    assert "| `items` | `list[str]` | `[]` |  |" in rows
    assert "| **resources** | | | |" in rows


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; reference belongs in docs/"


def _prose(text: str) -> str:
    """The text without fenced or indented code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("    ", "\t")))
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text(encoding="utf-8").replace("`", "")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


# A path on the machine that wrote the page. /home/ray/ is the KubeRay image's own path
# (k8s/Dockerfile), part of the documented commands, not the writer's machine.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|tmp|Users|home/(?!ray/))[/\w.-]*")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_absolute_paths_of_the_writing_machine(page):
    found = MACHINE_PATH.findall(page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(ROOT)} names paths of the machine that wrote it: {found}"


def test_config_module_stays_light():
    """The generator and this test import brainseg_ray.config: it must not pull in Ray or torch."""
    code = ("import sys, brainseg_ray.config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'pyarrow', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
