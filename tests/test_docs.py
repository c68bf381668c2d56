"""The manual (``docs/``, MkDocs) and the short README, held to the code they describe.

Documentation drifts silently: a setting is added without a row, a function moves and the
example still imports it from the old place, the README's set-up line stops being the one CI
runs. Each test here turns one kind of drift into a failure.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.utils.module_loading import import_string

from latentstore import conf

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SETTINGS_PAGE = DOCS / "settings.md"
GETTING_STARTED = DOCS / "getting-started.md"
CI_RUN = ROOT / ".ci" / "run"
README_MAX_LINES = 300

#: Every Markdown page whose code blocks are checked: the manual and the README. Globbed at
#: collection time, so pages added later are checked without touching this file.
PAGES = sorted(DOCS.glob("**/*.md")) + [README]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")
PYTHON = {"python", "py"}


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
    """``(language, source, first line number)`` of each fenced block of a Markdown page.

    Blocks indented under an admonition or a list item are dedented by their fence's indent,
    so their source is what a reader copies.
    """
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        blocks.append((opening["lang"].lower(), "\n".join(body) + "\n", i + 2))
        i = j + 1
    return blocks


def python_blocks(path: Path) -> list[tuple[str, int]]:
    return [(src, line) for lang, src, line in code_blocks(path) if lang in PYTHON]


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the build ------------------------------------------------------------------------------


def test_the_manual_builds_strictly_without_a_warning(tmp_path):
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError as exc:
        pytest.skip(
            f"MkDocs is not installed ({exc}); it comes with the `docs` extra, which the `test` "
            "extra and requirements.txt install"
        )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # mkdocs-material prints a banner about MkDocs 2.0 on every build; it is no warning
        # about this manual, and would bury the ones that are.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    warnings = [line for line in output.splitlines() if line.lstrip().startswith("WARNING")]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "settings" / "index.html").is_file()


# --- the settings reference ----------------------------------------------------------------

SCOPES = {"LATENTSTORE": conf.DEFAULTS, "each autoencoder": conf.DEFAULT_AUTOENCODER}
TABLE_HEADER = re.compile(r"^\|\s*key\s*\|\s*scope\s*\|\s*default\s*\|", re.I)


def cells(row: str) -> list[str]:
    # A cell may hold an escaped pipe (\|); only unescaped ones separate cells.
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def settings_rows() -> list[dict[str, str]]:
    """The rows of the settings page's reference table (there must be exactly one)."""
    lines = SETTINGS_PAGE.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if TABLE_HEADER.match(line)]
    assert len(starts) == 1, (
        f"{page_id(SETTINGS_PAGE)} must hold exactly one reference table with the header "
        f"'| key | scope | default | ...'; found {len(starts)}"
    )
    rows = []
    for offset, line in enumerate(lines[starts[0] + 2 :], start=starts[0] + 3):
        if not line.startswith("|"):
            break
        key, scope, default, meaning, *_ = cells(line) + [""] * 4
        rows.append({"key": key, "scope": scope.strip("`"), "default": default, "meaning": meaning})
        rows[-1]["line"] = str(offset)
    return rows


def documented_keys() -> dict[str, dict[str, dict[str, str]]]:
    keys: dict[str, dict[str, dict[str, str]]] = {scope: {} for scope in SCOPES}
    for row in settings_rows():
        where = f"{page_id(SETTINGS_PAGE)}:{row['line']}"
        name = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", row["key"])
        assert name, f"{where}: the key cell must be one key in backticks, got {row['key']!r}"
        assert row["scope"] in SCOPES, (
            f"{where}: scope {row['scope']!r} is not one of {sorted(SCOPES)}"
        )
        assert name[1] not in keys[row["scope"]], f"{where}: {name[1]} has two rows"
        assert row["meaning"], f"{where}: {name[1]} says nothing about what it does"
        keys[row["scope"]][name[1]] = row
    return keys


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_every_setting_has_exactly_one_row_in_the_reference(scope):
    documented = set(documented_keys()[scope])
    actual = set(SCOPES[scope])
    missing, unknown = sorted(actual - documented), sorted(documented - actual)
    assert not missing, f"keys of {scope} without a row in {page_id(SETTINGS_PAGE)}: {missing}"
    assert not unknown, f"{page_id(SETTINGS_PAGE)} has rows for keys {scope} lacks: {unknown}"


def _plain(value):
    # Tuples in the code read as lists or tuples in the docs alike.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_defaults_written_as_literals_match_the_code(scope):
    """A default cell whose first code span is a Python literal must equal the real default.

    Cells that describe the default in words (``one alias, `default`, ...``) are not literals
    and are left to the reader.
    """
    wrong = []
    for key, row in documented_keys()[scope].items():
        if key not in SCOPES[scope]:
            continue  # reported by the test above
        span = re.search(r"`([^`]+)`", row["default"])
        if not span:
            continue
        try:
            written = ast.literal_eval(span[1])
        except (ValueError, SyntaxError):
            continue
        if _plain(written) != _plain(SCOPES[scope][key]):
            wrong.append(f"{key}: the docs say {span[1]}, the code {SCOPES[scope][key]!r}")
    assert not wrong, f"{page_id(SETTINGS_PAGE)}: " + "; ".join(wrong)


# --- the README --------------------------------------------------------------------------------


def setup_lines() -> tuple[str, str]:
    """The test line ``.ci/run`` runs, and the demo line that shares its install steps."""
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    test_lines = [line for line in ci_lines if line.endswith("-m pytest")]
    assert len(test_lines) == 1, f".ci/run should run one pytest line, found {test_lines}"
    test = test_lines[0]
    install = test.rsplit("&&", 1)[0].rstrip()
    return install + " && .venv/bin/python manage.py latents_demo", test


def bash_lines(path: Path) -> set[str]:
    return {
        line.strip()
        for lang, src, _line in code_blocks(path)
        if lang in {"bash", "sh", "shell", "console"}
        for line in src.splitlines()
    }


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail to docs/"
    )


@pytest.mark.parametrize("path", [README, GETTING_STARTED], ids=page_id)
def test_the_setup_commands_are_the_ones_ci_runs(path):
    demo, test = setup_lines()
    commands = bash_lines(path)
    assert demo in commands, f"{page_id(path)} lacks the demo command, exactly:\n{demo}"
    assert test in commands, f"{page_id(path)} lacks .ci/run's test command:\n{test}"


def _slugs(page: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", page.read_text(encoding="utf-8"), re.M)
    # Headings render their inline code without backticks before the slug is made.
    return {slugify(h.replace("`", ""), "-") for h in headings}


def test_readme_links_lead_to_files_and_headings_that_exist():
    text = README.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # external, or a heading of the README itself
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _slugs(file):
            broken.append(f"{target}: no heading with that anchor in {path}")
    assert not broken, "README.md links: " + "; ".join(broken)


# --- code in the docs ------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_python_blocks_compile(path):
    errors = []
    for src, line in python_blocks(path):
        try:
            compile(src, f"{page_id(path)}:{line}", "exec")
        except SyntaxError as exc:
            errors.append(f"block at line {line}: {exc.msg} (block line {exc.lineno})")
    assert not errors, f"{page_id(path)}: " + "; ".join(errors)


def test_the_project_page_has_python_to_compile():
    # The compile test passes vacuously on a page whose blocks lost their language tag. The
    # page users copy their wiring from is "Use it in your project".
    assert len(python_blocks(DOCS / "your-project.md")) >= 5


def _import_nodes(src: str) -> list[ast.AST]:
    try:
        return list(ast.walk(ast.parse(src)))
    except SyntaxError:
        # Reported by test_python_blocks_compile; still check the import lines it holds.
        nodes: list[ast.AST] = []
        for line in src.splitlines():
            if re.match(r"\s*(from|import)\s+latentstore", line):
                try:
                    nodes += list(ast.walk(ast.parse(line.strip())))
                except SyntaxError:
                    pass
        return nodes


def _ours(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in {"latentstore", "latentstore_workers"}


def _import_problem(module: str, names: list[str]) -> str | None:
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        return f"import {module}: {exc}"
    for name in names:
        if hasattr(loaded, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            return f"from {module} import {name}: {module} has no {name!r}"
    return None


def import_problems(path: Path) -> list[str]:
    problems = []
    for src, line in python_blocks(path):
        for node in _import_nodes(src):
            problem = None
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _ours(alias.name):
                        problem = problem or _import_problem(alias.name, [])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module):
                problem = _import_problem(node.module, [a.name for a in node.names])
            elif isinstance(node, ast.Dict):
                # A decoder's BACKEND names a class by dotted path: it must resolve too.
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "BACKEND"
                        and isinstance(value, ast.Constant)
                        and _ours(str(value.value))
                    ):
                        try:
                            import_string(value.value)
                        except ImportError as exc:
                            problem = f"BACKEND {value.value}: {exc}"
            if problem:
                problems.append(f"block at line {line}: {problem}")
    return problems


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_latentstore_imports_in_code_blocks_resolve(path):
    problems = import_problems(path)
    assert not problems, f"{page_id(path)} names what the code lacks: " + "; ".join(problems)


def test_the_import_check_catches_a_name_that_does_not_exist(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\n"
        "from latentstore.fields import LatentImageField, NoSuchThing\n"
        "import latentstore.no_such_module\n"
        'DECODERS = {"x": {"BACKEND": "latentstore.decoders.NoSuchDecoder"}}\n'
        "```\n",
        encoding="utf-8",
    )
    problems = import_problems(page)
    assert len(problems) == 3, problems
    for missing in ("NoSuchThing", "no_such_module", "NoSuchDecoder"):
        assert any(missing in problem for problem in problems), (missing, problems)
