"""The README's command-line demo, run as a newcomer runs it: in a fresh copy of the repository, the bash block as it
stands. Run once per session; the README test checks what it printed and wrote, and the demo's learning tests judge
the LoRA it trained."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- the README flow test runs this block as it stands -->"


@dataclass(frozen=True)
class ReadmeRun:
    """The fresh copy the block ran in, and the finished process (its output, for the README test)."""

    copy: Path
    done: subprocess.CompletedProcess

    @property
    def run(self) -> Path:
        """The run folder the block trains into."""
        return self.copy / "workspace" / "outputs" / "demo"


def readme_block() -> str:
    """The bash block that follows the mark."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"```bash\n(.*?)```", text[text.index(MARK):], re.S).group(1)


def fresh_copy(target: Path) -> Path:
    """The repository's files as a clone would have them (ignored files left out), with this checkout's
    virtual environment standing in for the one the README's first command creates."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    (target / ".venv").symlink_to(Path(sys.prefix))
    return target


def run_readme_demo(target: Path) -> ReadmeRun:
    """Copy the repository to ``target`` and run the block there; a failure stops every test that needs it."""
    copy = fresh_copy(target)
    assert not (copy / "workspace").exists()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=copy, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return ReadmeRun(copy, done)
