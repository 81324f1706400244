import subprocess
import sys
import zipfile


def test_wheel_ships_task_files_and_works_from_any_directory(tmp_path):
    """`pip install .` puts the bundled tasks inside the package: `extractor tasks` works anywhere."""
    from tests.conftest import REPO
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels,
                    str(REPO)], check=True, capture_output=True)
    (wheel,) = wheels.glob("extractor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for task in ("jd_requirements", "spo", "review_topic", "skills"):
        assert f"extractor/_tasks/prompts/{task}.yaml" in names
        assert f"extractor/_tasks/schemas/{task}.json" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import extractor, sys; from extractor.cli.main import main; print(extractor.__file__, file=sys.stderr); main()"
    out = subprocess.run([sys.executable, "-c", code, "tasks"], cwd=elsewhere, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stderr  # the installed copy ran, not the checkout
    for task in ("jd_requirements", "spo", "review_topic", "skills"):
        assert task in out.stdout
