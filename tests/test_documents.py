"""What the repository says to its readers: no project history in user-facing text, no dangling references.

Scanned: every tracked ``*.md``, ``*.yaml`` / ``*.yml`` and shell script, and the comments and string literals
(docstrings and messages included) of every tracked ``*.py``; ``tests/`` and ``CHANGELOG.md`` (the one place for
history) are left out. A finding names the file, the line and the rule; the fix is to say what the code or the
measurement is, not when or by whom it was made (history goes to CHANGELOG.md, numbers to a result folder under
benchmarks/results/ with the command that produced them).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_ORDINALS = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|previous|next|this|last|that"
# (rule name, pattern): each pattern is searched in one line of prose
RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("numbered work session", re.compile(r"\bsessions?[ -]?#?\d", re.IGNORECASE)),
    ("work session", re.compile(rf"\b(?:{_ORDINALS})[ -]sessions?\b|\bsession's\b", re.IGNORECASE)),
    ("issue number", re.compile(r"\bissues? ?#?\d+|(?<![\w&/#])#\d{1,5}\b(?![\w-])", re.IGNORECASE)),
    ("numbered round of work", re.compile(r"\brounds? ?#?\d", re.IGNORECASE)),
    ("design document outside the repository", re.compile(r"\bDESIGN\b|DESIGN\.md|§ ?\d")),
    ("path outside the repository", re.compile(r"\.\./shared\b|/work/(?:shared|notes|main)\b")),
    ("how machines were obtained", re.compile(r"\blent\b|\bdevice (?:time|tool|call)s?\b|\bnvidia-h[12]00-x\d", re.I)),
    (
        "commit hash",
        re.compile(
            r"\bcommits? [0-9a-f]{7,40}\b|(?<![\w./\\-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b(?![.\w-])"
        ),
    ),
)

SKIP_PREFIXES = ("tests/",)
SKIP_FILES = {"CHANGELOG.md"}
SCANNED_SUFFIXES = (".md", ".yaml", ".yml", ".sh", ".py")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:  # a source tree without git metadata
        pytest.skip(f"git ls-files is not available here: {exc}")
    return [p for p in out.stdout.splitlines() if (ROOT / p).is_file()]


def prose_lines(path: str, text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the prose in ``text``: every line of a document, comments and strings of Python."""
    if not path.endswith(".py"):
        yield from enumerate(text.splitlines(), start=1)
        return
    kinds = {tokenize.COMMENT, tokenize.STRING}
    if sys.version_info >= (3, 12):
        kinds.add(tokenize.FSTRING_MIDDLE)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in kinds:
            for offset, line in enumerate(tok.string.splitlines()):
                yield tok.start[0] + offset, line


def findings_in(path: str, text: str) -> list[str]:
    found = []
    for number, line in prose_lines(path, text):
        for rule, pattern in RULES:
            match = pattern.search(line)
            if match:
                found.append(f"{path}:{number}: {rule}: {match.group(0)!r} in {line.strip()[:160]!r}")
    return found


def scanned_files() -> list[str]:
    return [
        p
        for p in tracked_files()
        if p.endswith(SCANNED_SUFFIXES) and not p.startswith(SKIP_PREFIXES) and Path(p).name not in SKIP_FILES
    ]


def test_user_facing_text_carries_no_project_history() -> None:
    problems = []
    for path in scanned_files():
        problems += findings_in(path, (ROOT / path).read_text(encoding="utf-8", errors="replace"))
    assert not problems, "history or outside references in user-facing text:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "text", "rule"),
    [
        ("README.md", "Measured in session 8 on the new kernels.", "numbered work session"),
        ("docs/x.md", "Fixed in the fifth session.", "work session"),
        ("a.yaml", "# targets (issue 5): x1.6", "issue number"),
        ("README.md", "see #12 for the discussion", "issue number"),
        ("notes.md", "Round 3 made it faster.", "numbered round of work"),
        ("README.md", "The shape is DESIGN's reference.", "design document outside the repository"),
        ("README.md", "Protocol: `../shared/DESIGN.md` §7", "path outside the repository"),
        ("README.md", "on GPU 0 of a lent 2 x H100 machine", "how machines were obtained"),
        ("x.yaml", "# one call on `nvidia-h100-x4` per block", "how machines were obtained"),
        ("README.md", "until commit d1f83d2 our rows kept the model", "commit hash"),
        ("README.md", "fixed by 4bb87e2, measured after", "commit hash"),
        ("mod.py", '"""Module.\n\nNumbers from the third session."""\nX = 1\n', "work session"),
        ("mod.py", "X = 1  # see DESIGN section 7\n", "design document outside the repository"),
        ("mod.py", 'raise ValueError(f"{name}: measured in round 2")\n', "numbered round of work"),
    ],
)
def test_planted_examples_are_caught(path: str, text: str, rule: str) -> None:
    found = findings_in(path, text)
    assert any(f": {rule}: " in f for f in found), found


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("README.md", "FSDP2 with `start_new_session=True`; round(x, 2); 0.7978845608028654; e4m3; sha 1.4426950408"),
        ("README.md", "| `2026-11-25-h100-x1-core` | 3.4028234663852886e38 | 128256 | 5e-324 | run #a1 |"),
        ("README.md", "`benchmarks/results/2026-11-26-h200-x4-fsdp2-scaling/` on 4 GPUs; design choices; a lenticular"),
        ("mod.py", "x = session_id + 1  # a training run, the loss of step 7\n"),
        ("mod.py", '"""torchrun starts its workers in sessions of their own (start_new_session)."""\n'),
        ("a.yaml", "color: '#ffaa00'\nseed: 20240601\n"),
    ],
)
def test_ordinary_text_passes(path: str, text: str) -> None:
    assert findings_in(path, text) == []


_RESULT_PATH = re.compile(r"benchmarks/results/[\w.-]+(?:/[\w.-]*[\w])*")
_RELATIVE_RESULT_PATH = re.compile(
    r"`(results/[\w.-]+(?:/[\w.-]*[\w])*)|(?<![\w.])(\.\./\d{4}-[\w.-]+(?:/[\w.-]*[\w])*)"
)


def test_referenced_result_paths_exist() -> None:
    """Every result path a tracked file names exists: ``benchmarks/results/...`` anywhere, ``results/...`` in
    benchmarks/README.md, ``../<folder>/...`` between result folders."""
    missing = []
    for path in tracked_files():
        if not path.endswith((".md", ".py", ".yaml", ".yml", ".sh")):
            continue
        text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            refs = [ROOT / m.group(0).rstrip(".") for m in _RESULT_PATH.finditer(line)]
            if path.startswith("benchmarks/") and path.endswith(".md"):
                for m in _RELATIVE_RESULT_PATH.finditer(line):
                    rel = m.group(1) or m.group(2)
                    refs.append(((ROOT / "benchmarks") if m.group(1) else (ROOT / path).parent) / rel.rstrip("."))
            missing += [f"{path}:{number}: {ref.relative_to(ROOT)}" for ref in refs if not ref.exists()]
    assert not missing, "references to result paths that do not exist:\n" + "\n".join(missing)


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_markdown_links_to_repository_files_resolve() -> None:
    missing = []
    for path in tracked_files():
        if not path.endswith(".md"):
            continue
        base = (ROOT / path).parent
        for number, line in enumerate((ROOT / path).read_text(encoding="utf-8").splitlines(), start=1):
            for target in _LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                    continue
                if not (base / target).exists():
                    missing.append(f"{path}:{number}: {target}")
    assert not missing, "Markdown links to files that do not exist:\n" + "\n".join(missing)


_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}-(?:[a-z0-9]+-x\d+|cpu)-[a-z0-9]+(?:-[a-z0-9]+)*$")


def test_result_folders_follow_the_naming_scheme_and_say_how_they_were_made() -> None:
    tracked = [p for p in tracked_files() if p.startswith("benchmarks/results/")]
    folders = sorted({p.split("/")[2] for p in tracked if p.count("/") >= 3})
    loose = [p for p in tracked if p.count("/") == 2]
    assert folders, "no committed results"
    assert not loose, f"files directly under benchmarks/results/: {loose}"
    bad = [f for f in folders if not _FOLDER.match(f)]
    assert not bad, f"result folders not named <date>-<gpu>-x<count>-<topic>: {bad}"
    for folder in folders:
        readme = RESULTS / folder / "README.md"
        assert readme.is_file(), f"{folder} has no README.md"
        text = readme.read_text(encoding="utf-8")
        assert re.search(r"(python3?|bash) (benchmarks|-m pytest)", text), f"{folder}/README.md names no command"
        assert re.search(r"H100|H200|GPU|CPU", text), f"{folder}/README.md names no machine"
        raw = [p for p in tracked if p.startswith(f"benchmarks/results/{folder}/") and p.endswith(".log")]
        assert not raw, f"{folder}: raw logs belong in raw.tar.gz: {raw}"


def test_runner_default_folder_name_follows_the_scheme() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import benchlib
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert benchlib.results_folder_name("NVIDIA H100 80GB HBM3", 1, "scenarios", "2026-12-06") == (
        "2026-12-06-h100-x1-scenarios"
    )
    assert benchlib.results_folder_name("NVIDIA H200", 4, "scenarios-multigpu", "2026-12-06") == (
        "2026-12-06-h200-x4-scenarios-multigpu"
    )
    assert benchlib.results_folder_name("cpu", 2, "scenarios-cpu", "2026-12-06") == "2026-12-06-cpu-scenarios-cpu"
    for name in ("2026-12-06-h100-x1-scenarios", "2026-12-06-h200-x4-scenarios-multigpu"):
        assert _FOLDER.match(name)
