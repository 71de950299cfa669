"""The package layout shows the spine, and README's module table is the tree, exactly."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = {
    "__init__.py",
    "_version.py",
    "cli.py",
    "client.py",
    "config.py",
    "storage.py",
    "cluster.py",
    "errors.py",
    "testing.py",
    "provenance.py",
}


def modules() -> set[str]:
    out = set()
    for p in REPO.glob("tn_ray/**/*.py"):
        if p.name == "_version.py" or (p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))):
            continue
        out.add(str(p.relative_to(REPO)))
    return out


def test_top_level_holds_only_the_shared_foundation():
    assert {p.name for p in (REPO / "tn_ray").glob("*.py")} <= TOP_LEVEL


def test_readme_module_table_is_the_tree():
    readme = (REPO / "README.md").read_text()
    listed = set(re.findall(r"^\| `(tn_ray/[^`]+\.py)` \|", readme, flags=re.M))
    assert listed == modules(), (
        f"in the tree, not in README: {sorted(modules() - listed)}; "
        f"in README, not in the tree: {sorted(listed - modules())}"
    )
    named = set(
        re.findall(r"tn_ray/[A-Za-z0-9_/]+\.py", readme + "".join(p.read_text() for p in (REPO / "docs").glob("*.md")))
    )
    assert not [n for n in named if not (REPO / n).is_file()]


def test_every_user_error_class_derives_from_the_one_base():
    """Classes named *Error in tn_ray are TnRayError subclasses (user errors) or documented bugs."""
    import importlib

    from tn_ray.errors import TnRayError

    for path in modules():
        tree = ast.parse((REPO / path).read_text())
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith(("Error", "Mismatch"))]
        if not names:
            continue
        mod = importlib.import_module(path[:-3].replace("/", "."))
        for name in names:
            assert issubclass(getattr(mod, name), TnRayError), f"{path}: {name} is not a TnRayError"


def test_the_command_line_starts_without_the_heavy_stack():
    """`tn-ray ...` imports tn_ray.cli and every command's parser first: none of them may load torch,
    Ray, diffusers, ... (ruff's TID253 bans them at module level there; this checks what really loads)."""
    import subprocess
    import sys

    heavy = [
        "torch",
        "ray",
        "diffusers",
        "transformers",
        "open_clip",
        "peft",
        "pandas",
        "pyarrow",
        "numpy",
        "scipy",
        "sklearn",
        "matplotlib",
        "fastapi",
        "uvicorn",
        "optuna",
        "openai",
        "PIL",
    ]
    code = f"import sys, tn_ray.cli as c; c.build_parser(); print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_quickstart_steps_read_the_packaged_yamls_the_docs_show():
    """The quickstart's best-of-n, RWR and DDPO settings are the files of ``sweeps/`` (links to the packaged
    YAMLs, shipped as package data): one file each, so the quickstart cannot drift from the docs."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from tn_ray.config import load_config
    from tn_ray.experiments import quickstart
    from tn_ray.experiments.bestofn import BestOfNConfig
    from tn_ray.training.ddpo import DDPOConfig
    from tn_ray.training.rwr import RwrConfig

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tn_ray"]
    for name, model in (
        ("bestofn_tiny.yaml", BestOfNConfig),
        ("rwr_tiny.yaml", RwrConfig),
        ("ddpo_tiny.yaml", DDPOConfig),
        ("bestofn_world.yaml", BestOfNConfig),
        ("rwr_world.yaml", RwrConfig),
        ("ddpo_world.yaml", DDPOConfig),
    ):
        packaged = quickstart.SETTINGS / name
        assert (REPO / "sweeps" / name).resolve() == packaged.resolve(), f"sweeps/{name} is not the packaged file"
        assert any(fnmatch.fnmatch(str(packaged.relative_to(REPO / "tn_ray")), p) for p in patterns), name
        ran = quickstart.settings(name, model, out="/tmp/q")
        shown = load_config(REPO / "sweeps" / name, model, {"out": "/tmp/q"})
        assert ran == shown
    ddpo = quickstart.settings("ddpo_tiny.yaml", DDPOConfig)
    assert (ddpo.max_steps, ddpo.train.kl_coef) == (4, 1.0)  # issue 22: the quickstart ran 3 and 0 before
