"""The documents say what the code is: every module has its line in docs/design.md's layout, the
README's lists match the code's, and nothing points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_modules() -> set[str]:
    """The modules docs/design.md's "Code layout" block names, as paths under alexcli/."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("## Code layout", 1)[1].split("```", 2)[1]
    named, folder = set(), None
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        indent, word = len(m.group(1)), m.group(2)
        if indent == 0:
            folder = None if word != "alexcli/" else ""
        elif folder is not None and indent == 2:
            if word.endswith("/"):
                folder = word
                named.add(word)
            elif word.endswith(".py"):
                named.add(word)
                folder = ""
        elif folder and indent == 4 and word.endswith(".py"):
            named.add(folder + word)
    return named


def test_every_module_has_its_line_in_the_design_layout():
    named = layout_modules()
    modules = {str(p.relative_to(ROOT / "alexcli")) for p in (ROOT / "alexcli").rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts}
    # a package's modules are listed under it, but cli/'s are described on its one line
    missing = sorted(m for m in modules if m not in named and not (m.startswith("cli/") and "cli/" in named))
    assert not missing, f"docs/design.md's code layout lacks: {', '.join(missing)}"
    gone = sorted(m for m in named if m.endswith(".py") and m not in modules)
    assert not gone, f"docs/design.md's code layout names modules that do not exist: {', '.join(gone)}"


def test_readme_lists_the_options_resume_may_change():
    from alexcli.train.config import RESUME_MAY_CHANGE

    text = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"\(only (.*?) may change\)", text).group(1)
    options = set(re.findall(r"`(--[a-z-]+)`", listed))
    assert options == {"--" + f.replace("_", "-").replace("verify", "no-verify") for f in RESUME_MAY_CHANGE}


def test_nothing_in_the_repository_points_outside_it():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".cfg", ".txt", ".yml", ".yaml") and path.name != "run":
            continue
        text = path.read_text(errors="replace")
        if name != "tests/test_docs.py" and re.search(r"\.\./shared|/work/|DESIGN\.md|STYLE\.md", text):
            bad.append(name)
    assert not bad, f"these refer to paths outside the repository: {', '.join(bad)}"


def test_every_test_docs_faults_names_exists():
    """docs/faults.md's table promises; each row names the tests that show it: they must exist."""
    text = (ROOT / "docs" / "faults.md").read_text()
    missing = []
    for row in text.splitlines():
        if not row.startswith("|"):
            continue
        current = None
        for ref in re.findall(r"`([^`]*::[^`]*|faults/test_[a-z_]+\.py|test_[a-z_]+\.py)`", row):
            path, _, name = ref.partition("::")
            current = path or current
            if current and name:
                source = (ROOT / "tests" / current).read_text() if (ROOT / "tests" / current).is_file() else ""
                if f"def {name}(" not in source:
                    missing.append(f"{current}::{name}")
    assert not missing, f"docs/faults.md names tests that do not exist: {', '.join(missing)}"
