"""The README stays a short landing page and the docs only point at things that exist: relative
links (and their #anchors) resolve, the files docs/method.md cites are in the repository, and so
are the docs/ pages the code refers to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

# [text](target) outside code; images too. Targets with a scheme or only an anchor are handled apart.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_CITED = re.compile(r"`((?:hub_backdoor|tests|benchmarks|integrations|docs|cards)/[\w./-]+)`")


def _prose(text: str) -> str:
    """The page without fenced blocks and inline code, where a link is only an example."""
    return _CODE.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_readme_is_a_landing_page():
    data = README.read_bytes()
    assert len(data) <= 8 * 1024, f"README.md is {len(data)} bytes; move reference material to docs/"
    head = "\n".join(data.decode("utf-8").splitlines()[:6])
    assert "./dev demo" in head and "./dev test" in head


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (ROOT not in dest.parents and dest != ROOT):
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_method_cites_files_that_exist():
    cited = set(_CITED.findall((ROOT / "docs" / "method.md").read_text(encoding="utf-8")))
    assert cited, "docs/method.md cites no code"
    missing = sorted(c for c in cited if not (ROOT / c).exists())
    assert not missing, f"docs/method.md cites files that are not in the repository: {missing}"


def test_code_refers_to_docs_that_exist():
    sources = [*ROOT.glob("hub_backdoor/**/*.py"), *ROOT.glob("integrations/**/*.py")]
    sources += [*ROOT.glob("tests/*.py"), ROOT / "dev", ROOT / ".pre-commit-hooks.yaml"]
    missing = sorted(
        f"{src.relative_to(ROOT)}: {ref}"
        for src in sources
        for ref in set(re.findall(r"\bdocs/[\w-]+\.md", src.read_text(encoding="utf-8")))
        if not (ROOT / ref).exists()
    )
    assert not missing, missing


def test_every_exit_code_is_documented_and_in_help():
    # one list of exit codes (hub_backdoor.errors); the docs table and `--help` cover all of them
    from hub_backdoor.cli import build_parser
    from hub_backdoor.errors import EXIT_MEANINGS, ExitCode

    assert set(EXIT_MEANINGS) == set(ExitCode)
    table = (ROOT / "docs" / "cli.md").read_text().split("## Exit codes", 1)[1]
    rows = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert rows == {int(c) for c in ExitCode if c != ExitCode.INTERRUPTED}
    assert "130" in table  # said in prose: the shell's convention
    epilog = " ".join(build_parser().format_help().split())
    for code, text in EXIT_MEANINGS.items():
        assert f"{int(code)} {text}" in epilog
