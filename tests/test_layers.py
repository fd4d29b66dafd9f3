"""The package's imports run one way, from the tools down to the model: no module imports one of a higher layer
(function-level imports included), so there are no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import convmixer_pl

PACKAGE = Path(convmixer_pl.__file__).parent

# lowest first; a module may import its own layer and those below it
LAYERS = [
    {"console", "files"},
    {"preprocessing", "resume", "depthwise", "model", "speed"},
    {"weights"},
    {"data"},
    {"module"},
    {"checkpoints"},
    {"plots"},
    {"callbacks"},
    {"export", "hub", "serve", "serve_page", "benchmark", "sweep"},
    {"cli"},
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def home(module: str) -> str:
    """`convmixer_pl.data.cifar` -> `data`: the package's top-level module or sub-package."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("convmixer_pl", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def imports_of(source: str, name: str, is_package: bool = False) -> set[str]:
    """The convmixer_pl modules that the module `name` imports, anywhere in its `source`, as absolute names."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("convmixer_pl.")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} if node.module else {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("convmixer_pl."):
            found.add(node.module)
    return {module for module in found if module.count(".") >= 1}


def upward_imports(source: str, name: str, is_package: bool = False) -> list[str]:
    return [target for target in imports_of(source, name, is_package)
            if LAYER_OF.get(home(target), -1) > LAYER_OF[home(name)]]


def test_every_module_has_a_layer():
    homes = {home(module_name(path)) for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py"}
    assert homes <= set(LAYER_OF), f"add {sorted(homes - set(LAYER_OF))} to LAYERS"


def test_imports_only_go_down():
    upward = [f"{path.relative_to(PACKAGE)} imports {target}"
              for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "__init__.py"
              for target in upward_imports(path.read_text(), module_name(path), path.name == "__init__.py")]
    assert not upward, "imports running up the layers: " + "; ".join(upward)


def test_the_checker_sees_upward_imports():
    """The checker itself can fail: relative, absolute and function-level imports up the layers are reported."""
    source = "from ..module import ConvMixerClassifier\ndef f():\n    import convmixer_pl.cli\n"
    assert sorted(upward_imports(source, "convmixer_pl.data.digits")) == ["convmixer_pl.cli", "convmixer_pl.module"]
    assert upward_imports("from .base import ImageDataModule\n", "convmixer_pl.data.digits") == []
