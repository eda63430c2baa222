"""Private names of transformers and torch (underscored attributes, Auto-mapping tables, weight-conversion internals)
are touched in one module only, `hkt_hf/compat.py`: when a release changes them, that file is the one to fix."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hkt_hf"
COMPAT = PACKAGE / "compat.py"
# Library modules that are internals as a whole (their public names are not a stable API).
INTERNAL_MODULES = ("transformers.models.", "transformers.core_model_loading", "torch.nn.modules")
# Library private names that hkt_hf also defines (overrides, class attributes of its built-in models): still foreign.
LIBRARY_PRIVATE = {"_no_split_modules", "_keys_to_ignore_on_save", "_load_from_checkpoint", "_load_best_model",
                   "_load_from_state_dict", "_BatchNorm", "_model_mapping", "_extra_content", "_tied_weights_keys"}
ACCESSORS = {"getattr", "hasattr", "setattr", "delattr"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_private_names() -> set[str]:
    """Underscored names that hkt_hf defines itself (functions, classes, variables, attributes it assigns)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if is_private(n)} - LIBRARY_PRIVATE


def foreign_private_uses(path: Path, own: set[str]) -> list[str]:
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own:
            uses.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.startswith(INTERNAL_MODULES):
                uses.append(f"line {node.lineno}: from {node.module} import ...")
            uses += [f"line {node.lineno}: import {a.name}" for a in node.names if is_private(a.name)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCESSORS
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and is_private(node.args[1].value) and node.args[1].value not in own):
            uses.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.Import):
            uses += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith(INTERNAL_MODULES)]
    return uses


def test_private_library_names_only_in_compat():
    own = own_private_names()
    found = {str(p.relative_to(PACKAGE)): uses for p in sorted(PACKAGE.rglob("*.py"))
             if p != COMPAT and (uses := foreign_private_uses(p, own))}
    assert not found, f"private transformers / torch names outside hkt_hf/compat.py (move them there): {found}"


def test_the_check_sees_a_private_use(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nfrom transformers.models.auto import modeling_auto\n"
                      "x = torch.nn.modules.batchnorm._BatchNorm\ny = getattr(x, '_no_split_modules', None)\n")
    assert len(foreign_private_uses(sample, set())) == 3


def test_compat_holds_them():
    assert foreign_private_uses(COMPAT, own_private_names()), "compat.py should be where they live"
