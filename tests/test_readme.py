"""README.md and docs/ stay true to the code: every config key is documented in docs/configuration.md, and every
path, module, launch/ option, config key and link that README.md or a docs/*.md page names exists."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import typing
from pathlib import Path
from unittest import mock

import pytest

from framework.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}
PAGES = {"README.md": README, **DOCS}  # every page a user reads, by its path in the repository
RECIPE_MODULES = ("recipes.medblip.pretrain", "recipes.medblip.vqa", "recipes.clip")


def dotted_keys(cls: type, prefix: str = "") -> set[str]:
    """Every leaf YAML key of dataclass `cls` as a dotted path; a dict of dataclasses contributes `<name>`."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("yaml", True):  # filled by the loader or the recipe, not read from YAML
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
    """The text of docs/configuration.md, the configuration reference."""
    text = DOCS["docs/configuration.md"]
    assert text.startswith("# Configuration reference\n")
    return text


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
    assert not missing, f"config keys missing from docs/configuration.md: {missing}"


def test_the_grouped_row_rule_is_strict():
    text = "| `train.lr`, `warmup_lr` | 1e-4, 0 | warmup |\n| `data.x` | 1 | `other` in the meaning |\n"
    assert is_documented("train.lr", text) and is_documented("train.warmup_lr", text)
    assert not is_documented("train.min_lr", text)  # not in the row
    assert not is_documented("data.other", text)  # named outside the first cell
    assert not is_documented("model.warmup_lr", text)  # another section's row


# --- Every name README.md and docs/*.md give exists -------------------------------------------------------------
# Names that legitimately do not exist in the repository. Each entry says why; nothing else is exempt.
ALLOWED_PATHS = (
    "recipes/mine/",  # docs/recipes.md's worked example of a new recipe, written by the reader
)
ALLOWED_MODULES = (
    "recipes.mine",  # the same example recipe, as a module
    "recipes.yours",  # docs/recipes.md: "a YAML with `recipe: recipes.yours`", a placeholder for the reader's package
)
ALLOWED_KEY_PREFIXES = (
    "deepspeed.",  # `deepspeed.*` overrides pass through to DeepSpeed's own configuration (its keys, not ours)
)
# Wrong on purpose: the bad input quoted in the error messages of docs/reliability.md and docs/troubleshooting.md.
ALLOWED_BAD_INPUT = {"recipes.nope", "train.lrate", "train.lr.peak", "train.lrr", "objectives.vqa"}
# Code files of other projects, named where our code follows or is compared with them, and placeholders.
UPSTREAM_FILES = {
    "blip_vqa.py", "models/blip_pretrain.py", "med.py", "configs/vqa.yaml", "caption_coco.yaml",
    "train_retrieval.py",  # salesforce/BLIP's code and configs
    "blip2_qformer.py",  # LAVIS's BLIP-2 Q-Former
    "scripts/fetch.py",  # the ROCO release's download script
    "other.yaml",  # docs/configuration.md and docs/demo.md: "`base: other.yaml`", any recipe of the reader's
}
USER_FOLDERS = ("runs/", "data/", "checkpoints/", "exports/")  # what the commands write: a user's files, not ours
# Top-level folders of this repository: a path under one of them is checked. Paths a user creates (runs/, data/,
# checkpoints/, exports/, ...) lie under none of them and are not checked.
REPO_FOLDERS = ("framework", "recipes", "launch", "corpora", "docs", "tests", ".ci")
ROOT_FILES = ("setup.py", "pytest.ini", "README.md", ".gitignore")
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "jsonl", "pth", "txt", "csv", "jpg", "png", "tar", "log", "sh",
                 "safetensors", "parquet", "ini"}

PATH_RE = re.compile(r"(?<![\w./$~-])((?:%s)/[\w./*-]*)|(?<![\w./$-])(%s)(?![\w.])" % (
    "|".join(re.escape(f) for f in REPO_FOLDERS), "|".join(re.escape(f) for f in ROOT_FILES)))
MODULE_RE = re.compile(r"(?<![\w./-])((?:framework|recipes|corpora)(?:\.[A-Za-z_]\w*)+)")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SCRIPT_RE = re.compile(r"(?<![\w/])(launch/[\w/]+\.py)")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    return re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M)


def inline_code(text: str) -> list[str]:
    """The `backticked` spans outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", prose(text))


def named_paths(text: str) -> set[str]:
    paths = set()
    for m in PATH_RE.finditer(text):
        path = (m.group(1) or m.group(2)).rstrip(".")
        paths.add(path)
    return paths


def path_exists(path: str) -> bool:
    if path.startswith(ALLOWED_PATHS):
        return True
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def named_code_files(text: str) -> set[str]:
    """Backticked .py / .yaml names given without a repository folder (`model/losses.py`, `dapt.yaml`)."""
    names = set()
    for span in inline_code(text):
        for token in span.split():
            token = token.strip("(),;:'\"")
            if re.fullmatch(r"[\w./-]*\w\.(?:py|ya?ml)", token) and not PATH_RE.fullmatch(token) \
                    and not token.startswith(USER_FOLDERS):
                names.add(token)
    return names


_CODE_FILES: list[str] = []


def code_file_exists(name: str) -> bool:
    """`name` is the tail of one of this repository's .py / .yaml files (e.g. recipes/medblip/model/losses.py)."""
    if name in UPSTREAM_FILES:
        return True
    if not _CODE_FILES:
        _CODE_FILES.extend(str(p.relative_to(ROOT)) for pattern in ("*.py", "*.yaml", "*.yml")
                           for p in ROOT.rglob(pattern)
                           if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))
    return any(f == name or f.endswith("/" + name) for f in _CODE_FILES)


def named_modules(text: str) -> set[str]:
    return {m for m in MODULE_RE.findall(text) if m.rsplit(".", 1)[1] not in FILE_SUFFIXES}


def module_exists(name: str) -> bool:
    """`name` is an importable module, or an attribute path inside one (framework.checkpoint.safe_load)."""
    if name.startswith(ALLOWED_MODULES) or name in ALLOWED_BAD_INPUT:
        return True
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def page_anchors(text: str) -> set[str]:
    """The anchors GitHub makes for `text`'s headings (repeats get -1, -2, ...), and explicit <a id="...">."""
    anchors: set[str] = set(re.findall(r'<a id="([^"]+)"', text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.*)$", prose(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(page: str, text: str) -> list[str]:
    """Relative links of `page` whose file or anchor does not exist."""
    broken = []
    for target in LINK_RE.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        file, _, anchor = target.partition("#")
        path = (ROOT / page).parent / file if file else ROOT / page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in page_anchors(path.read_text(encoding="utf-8")):
            broken.append(target)
    return broken


def commands(text: str) -> list[str]:
    """Command lines: every line of fenced shell blocks (backslash continuations joined) and every inline span."""
    lines = []
    for lang, body in fenced_blocks(text):
        if lang in ("", "bash", "sh", "shell"):
            lines += body.replace("\\\n", " ").splitlines()
    return lines + inline_code(text)


def named_options(text: str) -> set[tuple[str, str]]:
    """(script, --option) for each option written after a launch/ script in a command, up to a pipe or `&&`."""
    named = set()
    for line in commands(text):
        for m in SCRIPT_RE.finditer(line):
            rest = re.split(r"&&|\||;", line[m.end():])[0]
            named |= {(m.group(1), opt) for opt in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", rest)}
    return named


class _Parsed(Exception):
    pass


_OPTIONS: dict[str, set[str]] = {}


def script_options(script: str) -> set[str]:
    """The command-line options of launch/<...>.py, read from its argparse parser (main() stopped at parsing)."""
    if script not in _OPTIONS:
        from tests.conftest import load_launch

        module = load_launch(script[len("launch/"):-len(".py")])
        parsers = []

        def capture(self, *args, **kwargs):
            parsers.append(self)
            raise _Parsed

        with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
                mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
            with pytest.raises(_Parsed):
                module.main([])
        _OPTIONS[script] = {s for action in parsers[0]._actions for s in action.option_strings}
    return _OPTIONS[script]


def shipped_recipe_configs() -> list[type]:
    """The Config class of every recipe module a shipped YAML names (MedBLIP, BLIP-2, CLIP, toy, ...)."""
    modules = {m for p in (ROOT / "recipes").rglob("*.yaml")
               for m in re.findall(r"^recipe:\s*(recipes\.[\w.]+)\s*$", p.read_text(encoding="utf-8"), re.M)}
    return [importlib.import_module(name).RECIPE.config for name in sorted(modules)]


def recipe_config_keys() -> set[str]:
    """The dotted keys of every shipped recipe's config."""
    keys = dotted_keys(Config)
    for config in shipped_recipe_configs():
        keys |= dotted_keys(config)
    return keys


def retired_config_keys() -> set[str]:
    """Keys earlier versions wrote that a shipped recipe drops on reading (Config.RETIRED): docs may name them."""
    return {k for config in shipped_recipe_configs() for k in config.RETIRED}


def named_keys(text: str, sections: set[str]) -> set[str]:
    """Dotted names starting with a config section, in inline code and in non-Python fenced blocks."""
    spans = inline_code(text) + [body for lang, body in fenced_blocks(text) if lang != "python"]
    # a name followed by "(" is a call in code (run.forward(batch), model.parameters()), not a key
    pattern = re.compile(r"(?<![\w.$/<-])((?:%s)(?:\.(?:<\w+>|[\w*]+))+)(?![\w(])" % "|".join(sorted(sections)))
    keys = set()
    for span in spans:
        for key in pattern.findall(span):
            if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:  # train.py, data.md are files, not keys
                keys.add(key)
    return keys


def key_exists(key: str, keys: set[str]) -> bool:
    if key.startswith(ALLOWED_KEY_PREFIXES) or key in ALLOWED_BAD_INPUT:
        return True
    parts = key.split(".")
    if parts[0] == "objectives" and len(parts) == 3:
        key = f"objectives.<name>.{parts[2]}"  # objectives.itm.enabled
    if key.endswith(".*"):
        key = key[:-2]
    return key in keys or any(k.startswith(key + ".") for k in keys)  # a leaf, or a section such as model.vit


def missing_names(page: str, text: str, keys: set[str]) -> dict[str, list[str]]:
    """What `text` (the page `page`) names that does not exist, by kind; empty lists when all exist."""
    sections = {k.split(".")[0] for k in keys if "." in k}
    return {
        "paths": sorted({p for p in named_paths(text) if not path_exists(p)}
                        | {f for f in named_code_files(text) if not code_file_exists(f)}),
        "links": broken_links(page, text),
        "modules": sorted(m for m in named_modules(text) if not module_exists(m)),
        "options": sorted(f"{s} {o}" for s, o in named_options(text)
                          if not path_exists(s) or o not in script_options(s)),
        "keys": sorted(k for k in named_keys(text, sections) if not key_exists(k, keys)),
    }


def test_every_name_in_the_readme_and_docs_exists():
    keys = recipe_config_keys()
    sections = {k.split(".")[0] for k in keys if "." in k}
    assert {"model.vision_weights", "model.llm_weights", "vqa.k_test", "model.in_dim"} <= keys  # BLIP-2, toy too
    missing, counted = {}, {"paths": 0, "links": 0, "modules": 0, "options": 0, "keys": 0}
    known = keys | retired_config_keys()  # docs/configuration.md names the retired ones as such
    for page, text in PAGES.items():
        found = {kind: names for kind, names in missing_names(page, text, known).items() if names}
        if found:
            missing[page] = found
        counted["paths"] += len(named_paths(text)) + len(named_code_files(text))
        counted["links"] += len(LINK_RE.findall(text))
        counted["modules"] += len(named_modules(text))
        counted["options"] += len(named_options(text))
        counted["keys"] += len(named_keys(text, sections))
    print("names checked per kind (summed over pages):", counted)
    assert not missing, f"README.md / docs/ name things that do not exist: {missing}"
    # the extraction finds names at all (a broken regex must not pass by finding nothing)
    assert counted["paths"] > 100 and counted["modules"] > 5 and counted["options"] > 30 and counted["keys"] > 100


def test_the_name_check_fails_on_made_up_names():
    keys = recipe_config_keys()
    fake = ("Run `python launch/train.py --recipe recipes/medblip/dapt.yaml --no-such-flag train.no_such_key=1`,\n"
            "read `launch/no_such_script.py`, `recipes/medblip/no_such.yaml` and [a page](docs/no_such.md),\n"
            "[an anchor](docs/vqa.md#no-such-section), import `recipes.medblip.no_such_module` and "
            "`framework.checkpoint.no_such_function`; set `model.no_such_width`; see `model/no_such_losses.py`.\n")
    found = missing_names("README.md", fake, keys)
    assert found == {
        "paths": ["docs/no_such.md", "launch/no_such_script.py", "model/no_such_losses.py",
                  "recipes/medblip/no_such.yaml"],
        "links": ["docs/no_such.md", "docs/vqa.md#no-such-section"],
        "modules": ["framework.checkpoint.no_such_function", "recipes.medblip.no_such_module"],
        "options": ["launch/train.py --no-such-flag"],
        "keys": ["model.no_such_width", "train.no_such_key"],
    }
    real = ("`python launch/train.py --recipe recipes/medblip/dapt.yaml train.lr=1` [x](docs/vqa.md), `recipes.toy`, "
            "`model/losses.py`, `psd.yaml`")
    assert not any(missing_names("README.md", real, keys).values())


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    """docs/medblip_model.md's model API snippet, executed as written with a tiny model and a generated image."""
    from PIL import Image

    code = re.search(r"The model as a Python API.*?```python\n(.*?)```", DOCS["docs/medblip_model.md"], re.S).group(1)
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
    """docs/recipes.md's code and YAML, written out as the reader would, trained by launch/train.py."""
    from tests.conftest import run_entry

    section = DOCS["docs/recipes.md"]
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
