import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from extractor.cli.main import cli

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def shared_path(*parts) -> Path:
    """A file under ../shared/, or skip the test cleanly when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def run_cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    def _run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return _run


@pytest.fixture
def user_tasks(tmp_path):
    """A tasks dir holding a copy of the bundled jd_requirements task, to edit in a test."""
    root = tmp_path / "tasks"
    (root / "prompts").mkdir(parents=True)
    (root / "schemas").mkdir()
    shutil.copy(REPO / "prompts" / "jd_requirements.yaml", root / "prompts" / "mytask.yaml")
    shutil.copy(REPO / "schemas" / "jd_requirements.json", root / "schemas" / "mytask.json")
    spec = root / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("name: jd_requirements", "name: mytask")
                    .replace("schema: jd_requirements.json", "schema: mytask.json"), encoding="utf-8")
    return root
