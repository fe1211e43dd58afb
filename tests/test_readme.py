"""The README stays true to the code: every config key is documented, every script and recipe it names exists."""
from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path

from framework.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Config fields the loader fills itself; they are not YAML keys (metadata yaml=False keeps them out of the YAML).
NOT_YAML_KEYS = {"source"}
RECIPE_MODULES = ("recipes.medblip.pretrain", "recipes.medblip.vqa", "recipes.clip")


def dotted_keys(cls: type, prefix: str = "") -> set[str]:
    """Every leaf YAML key of dataclass `cls` as a dotted path; a dict of dataclasses contributes `<name>`."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not prefix and issubclass(cls, Config) and f.name in NOT_YAML_KEYS:
            continue
        path, tp = f"{prefix}{f.name}", hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            keys |= dotted_keys(tp, f"{path}.")
        elif typing.get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
            keys |= dotted_keys(args[1], f"{path}.<name>.")  # objectives.<name>.weight
        else:
            keys.add(path)
    return keys


def all_config_keys() -> set[str]:
    keys = dotted_keys(Config)
    for name in RECIPE_MODULES:
        keys |= dotted_keys(importlib.import_module(name).RECIPE.config)
    return keys


def config_reference() -> str:
    """The text of README's `## Configuration reference` section (up to the next level-2 heading)."""
    m = re.search(r"^## Configuration reference\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, "README.md has no '## Configuration reference' section"
    return m.group(1)


def is_documented(key: str, text: str) -> bool:
    """`key` appears backticked in full, or as `last` in a grouped row whose first cell starts with `parent.`...

    e.g. `train.warmup_lr` is documented by the row "| `train.lr`, `warmup_lr`, ... | ...": the row's first
    backticked name shares the parent path and the row's first cell lists the last component.
    """
    if f"`{key}`" in text:
        return True
    parent, _, last = key.rpartition(".")
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", first_cell)
        if names and names[0].rpartition(".")[0] == parent and last in names[1:]:
            return True
    return False


def test_every_config_key_is_in_the_configuration_reference():
    text = config_reference()
    keys = all_config_keys()
    assert {"run.dir", "distill.tau_start", "model.vit.width", "vqa.k_test", "validation.recall_k",
            "image.draft", "model.vision_width", "objectives.<name>.weight", "recipe"} <= keys  # the walk works
    missing = sorted(k for k in keys if not is_documented(k, text))
    assert not missing, f"config keys missing from README's Configuration reference: {missing}"


def test_the_grouped_row_rule_is_strict():
    text = "| `train.lr`, `warmup_lr` | 1e-4, 0 | warmup |\n| `data.x` | 1 | `other` in the meaning |\n"
    assert is_documented("train.lr", text) and is_documented("train.warmup_lr", text)
    assert not is_documented("train.min_lr", text)  # not in the row
    assert not is_documented("data.other", text)  # named outside the first cell
    assert not is_documented("model.warmup_lr", text)  # another section's row


def test_every_script_recipe_doc_and_test_named_in_the_readme_exists():
    patterns = [r"launch/\w+\.py", r"recipes/[\w/.-]+?\.ya?ml", r"docs/[\w.-]+\.md", r"tests/test_\w+\.py"]
    named = sorted({m for p in patterns for m in re.findall(p, README)})
    assert any(n.startswith("launch/") for n in named) and any(n.startswith("recipes/") for n in named)
    # recipes/mine/ is the README's own worked example of a new recipe, written by the reader
    missing = [n for n in named if not (ROOT / n).is_file() and not n.startswith("recipes/mine/")]
    assert not missing, f"README names files that do not exist: {missing}"


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    """README's model API snippet, executed as written with a tiny model and a generated image."""
    from PIL import Image

    code = re.search(r"The model as a Python API.*?```python\n(.*?)```", README, re.S).group(1)
    tiny = '["run.init_from=null", "model.preset=tiny", "image.size=32", "model.queue_size=32"]'
    for old, new in (('["run.init_from=checkpoints/model_base.pth"]', tiny), ("size=224", "size=32")):
        assert old in code
        code = code.replace(old, new)
    Image.new("RGB", (300, 260), (90, 90, 90)).save(tmp_path / "ct.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace('"recipes/medblip/dapt.yaml"', repr(str(ROOT / "recipes/medblip/dapt.yaml"))),
                 "README.md", "exec"), scope)
    assert scope["img_feat"].shape == (1, 256) and scope["txt_feat"].shape == (1, 256)
    assert 0 <= float(scope["match"][0]) <= 1
    assert set(scope["out"]["losses"]) == {"itc", "itm", "lm"}


def test_the_new_recipe_example_trains(tmp_path):
    """README's "Adding a recipe" code and YAML, written out as the reader would, trained by launch/train.py."""
    from tests.conftest import run_entry

    section = README[README.index("## Adding a recipe"):README.index("## Performance")]
    code = re.search(r"```python\n# recipes/mine/__init__.py\n(.*?)```", section, re.S).group(1)
    yaml_text = re.search(r"```yaml\n# recipes/mine/mine.yaml\n(.*?)```", section, re.S).group(1)
    package = tmp_path / "recipes" / "mine"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(code)
    (package / "mine.yaml").write_text(yaml_text)
    from recipes.toy import make_shards

    make_shards(tmp_path / "data" / "mine")
    # the reader's own recipes/ folder on PYTHONPATH joins the project's recipes package (pkgutil.extend_path)
    env = {"PYTHONPATH": f"{ROOT}{__import__('os').pathsep}{tmp_path}"}
    proc = run_entry("train.py", "--recipe", str(package / "mine.yaml"), "train.epochs=1", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: finished" in proc.stdout and (tmp_path / "runs" / "mine" / "config.yaml").is_file()


def test_the_product_cites_no_file_its_users_do_not_have():
    """Code, recipes and docs explain themselves: none points at the developers' private design notes."""
    cited = [str(p.relative_to(ROOT)) for folder in ("framework", "recipes", "launch", "corpora", "docs")
             for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".yaml", ".md"}
             and "DESIGN.md" in p.read_text(encoding="utf-8")]
    cited += ["README.md"] if "DESIGN.md" in README else []
    assert cited == []
