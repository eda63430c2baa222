"""Model cards for HKT children: the lineage section, added to the Trainer's own card or to a card for a saved child.

`HKTTrainer.create_model_card` lets transformers write its card (same keywords, same meaning) and appends
`lineage_section`. `render_model_card` builds a whole card for a child folder pushed without a trainer
(`hkt_hf.hub.push_child`, `hkt-hf push`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .training_args import is_hub_id

TEMPLATES = Path(__file__).parent / "templates"
TAGS = ["hkt", "knowledge-distillation", "hereditary-knowledge-transfer"]
# The Hub's `base_model_relation` knows only adapter, merge, quantized and finetune (no distillation value).
BASE_MODEL_RELATION = "finetune"


def parent_on_hub(record: Mapping[str, Any]) -> bool:
    parent = record.get("hkt_parent")
    return bool(parent) and not os.path.exists(parent) and is_hub_id(parent)


def lineage_section(record: Mapping[str, Any], model_name: str, auto_class: str | None = None) -> str:
    """The card's HKT section: parent, carriers, gate, weights and KD, how to read the record, how to load the child
    (`auto_class`, when known) and the citation."""
    template = jinja2.Template((TEMPLATES / "lineage.md").read_text())
    return template.render(hkt=record, model_name=model_name, parent_on_hub=parent_on_hub(record), auto_class=auto_class)


def add_lineage_to_card(
    card_path: str | os.PathLike, record: Mapping[str, Any], model_name: str, auto_class: str | None = None
) -> ModelCard:
    """Append the lineage section to the card at `card_path` (as written by `Trainer.create_model_card`)."""
    card = ModelCard.load(card_path)
    card.text = card.text.rstrip() + "\n\n" + lineage_section(record, model_name, auto_class)
    card.save(card_path)
    return card


def _metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    return {key.removeprefix("eval_"): float(value) for key, value in (metrics or {}).items()}


def _metric_rows(child: dict[str, float], parent: dict[str, float]) -> list[tuple[str, str, str]]:
    """Rows (metric, child, parent) of the card's results table; '-' where one side was not measured."""
    names = list(child) + [name for name in parent if name not in child]
    return [(name, *(f"{side[name]:.4f}" if name in side else "-" for side in (child, parent))) for name in names]


def render_model_card(
    record: Mapping[str, Any],
    model_name: str,
    *,
    auto_class: str = "AutoModel",
    task: str | None = None,
    dataset: str | None = None,
    child_metrics: Mapping[str, float] | None = None,
    parent_metrics: Mapping[str, float] | None = None,
    training_recipe: Mapping[str, Any] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
) -> ModelCard:
    """A card for a saved child: Hub metadata (lineage, dataset, `model-index` of the child's metrics) and a body
    with the lineage, child and parent metrics, the training recipe and usage.

    Metrics are never invented: `child_metrics` / `parent_metrics` are what the caller measured (keys may keep an
    `eval_` prefix).
    """
    child, parent = _metrics(child_metrics), _metrics(parent_metrics)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    eval_results = None  # the Hub's model-index needs a task and a dataset for each result
    if task and dataset and child:
        eval_results = [
            EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=name, metric_value=value)
            for name, value in child.items()
        ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        license=license,
        tags=TAGS + [t for t in tags if t not in TAGS],
        base_model=record.get("hkt_parent") if parent_on_hub(record) else None,
        datasets=[dataset] if dataset else None,
        eval_results=eval_results,
        model_name=model_name,
    )
    if card_data.base_model:
        card_data["base_model_relation"] = BASE_MODEL_RELATION
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "model_card.md"),
        model_name=model_name,
        lineage=lineage_section(record, model_name, auto_class),
        dataset=dataset,
        metric_rows=_metric_rows(child, parent),
        recipe=[(key, value) for key, value in (training_recipe or {}).items() if value is not None],
    )
