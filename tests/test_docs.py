"""The documentation is self-contained: no tracked file cites a file users do not have, and every citation of
docs/recipes.md names a section that exists."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Written in pieces, so that this file does not cite them itself.
ABSENT = ["../" + "shared", "shared/" + "docs", "RECIPE" + ".md", "PRODUCT" + ".md", "RECIPE" + " §", "PRODUCT" + " §"]


def tracked_text_files() -> dict[str, str]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    texts = {}
    for name in names:
        try:
            texts[name] = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):  # shards and other binaries; a file deleted but not staged
            continue
    return texts


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_no_tracked_file_cites_files_users_do_not_have():
    found = [f"{name}:{number}: {line.strip()[:100]}" for name, text in tracked_text_files().items()
             for number, line in enumerate(text.splitlines(), start=1) if any(word in line for word in ABSENT)]
    assert not found, f"{len(found)} lines cite files that are not in the repository:\n" + "\n".join(found)


def test_every_citation_of_the_recipes_page_names_a_section_of_it():
    page = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    anchors = {github_anchor(line.lstrip("#")) for line in page.splitlines() if line.startswith("#")}
    assert {"model-2025-08-23", "optimizer-2026-08", "schedule-2026-08", "rules", "run-log"} <= anchors
    cited = {(name, anchor) for name, text in tracked_text_files().items()
             for anchor in re.findall(r"recipes\.md#([\w-]+)", text)}
    cited |= {("docs/recipes.md", anchor) for anchor in re.findall(r"\]\(#([\w-]+)\)", page)}
    assert len(cited) > 10
    missing = sorted(f"{name} cites #{anchor}" for name, anchor in cited if anchor not in anchors)
    assert not missing, "\n".join(missing)


def test_github_anchors():
    assert github_anchor(" Model (2025-08-23)") == "model-2025-08-23"
    assert github_anchor("Training windows (2025-08-23)") == "training-windows-2025-08-23"
    assert github_anchor("How FineWeb was tokenized") == "how-fineweb-was-tokenized"


def test_what_runs_and_exports_write_is_ignored_by_git():
    """Checkpoints, exports, logs and downloaded shards are a user's work, never to be committed by accident."""
    paths = ["records/checkpoints/run/step_10/model.safetensors", "exports/mymodel/model.safetensors",
             "records/logs/run.txt", "data/fineweb10B/fineweb_train_000001.bin"]
    try:
        result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True,
                                text=True)
    except OSError:
        pytest.skip("no git")
    if result.returncode > 1:
        pytest.skip("not a git checkout")
    assert result.stdout.split() == paths
