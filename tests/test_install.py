"""The package installs (pyproject.toml) and works from any folder, recipes included."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_imports_from_another_folder(tmp_path):
    src, target = tmp_path / "src", tmp_path / "site"  # a copy: pip builds in place (build/, *.egg-info)
    shutil.copytree(ROOT / "lion_min", src / "lion_min", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    code = ("import lion_min, lion_min.flags as c; print(lion_min.__file__); "
            "print(sorted(c.recipe_presets('dpo')))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    where, presets = out.stdout.splitlines()
    assert Path(where).is_relative_to(target)  # the installed copy, not the repository
    assert presets == "['lion-gemma-2b', 'lion-llama3-8b']"


def test_the_stages_run_as_modules():
    for stage in ("sft", "dpo", "online"):
        res = subprocess.run([sys.executable, "-m", f"lion_min.{stage}", "--help"], capture_output=True, text=True,
                             cwd=ROOT)
        assert res.returncode == 0 and "--model=" in res.stdout and "lion-gemma-2b" in res.stdout, res.stderr
