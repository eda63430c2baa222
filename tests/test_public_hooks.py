"""hkt-hf uses transformers' Trainer through its public hooks only; the one workaround for a transformers bug that
needs a private member lives in `hkt_hf/compat.py`, with a link to the upstream issue."""

from __future__ import annotations

import ast
from pathlib import Path

from transformers import Seq2SeqTrainer, Trainer

PACKAGE = Path(__file__).resolve().parents[1] / "hkt_hf"
WORKAROUNDS = PACKAGE / "compat.py"
PRIVATE = {n for cls in (Trainer, Seq2SeqTrainer) for n in dir(cls) if n.startswith("_") and not n.startswith("__")}


def private_trainer_members(path: Path) -> list[str]:
    """`x._name` accesses and `def _name` overrides of the Trainer's private members in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in PRIVATE:
            found.append(f"{path.name}:{node.lineno} def {node.name}")
    return found


def test_no_private_trainer_member_outside_the_workaround_module():
    assert PRIVATE, "transformers' Trainer has no private members? The check would be empty."
    used = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != WORKAROUNDS for hit in private_trainer_members(path)]
    assert used == []


def test_the_workaround_module_names_its_upstream_issue_and_is_the_only_user():
    hits = private_trainer_members(WORKAROUNDS)
    assert hits, "the workaround module no longer needs a private member: delete it"
    assert "github.com/huggingface/transformers/issues/" in WORKAROUNDS.read_text()
