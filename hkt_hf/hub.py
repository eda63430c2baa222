"""Share HKT children on the Hugging Face Hub.

Push: `push_child` uploads a saved child (weights, config, processor, `hkt_config.json`) with a model card rendered
from `templates/model_card.md`. Aligners and gates are training-only: they never leave the machine.
Pull: children of the built-in architectures load with the transformers Auto classes after `import hkt_hf`;
`load_lineage` reads a child's `hkt_config.json` (local folder or Hub id) and `format_lineage` prints it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, hf_hub_download, upload_folder
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RemoteEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from .adapter import ADAPTER_NAME
from .config import HKT_CONFIG_NAME, HKTConfig

if TYPE_CHECKING:
    from .trainer import HKTTrainer

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"

# What a child repository holds: the plain model, its processor / tokenizer, the lineage record and the card.
# An allow-list, so that checkpoints, optimizer states and training arguments in the same folder stay local.
CHILD_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "chat_template.*",
    HKT_CONFIG_NAME,
    "README.md",
]

# The Hub's `base_model_relation` knows only adapter, merge, quantized and finetune (no distillation value).
# A child trained with its parent's knowledge is listed as a finetune of the parent; tags and card say it is HKT.
BASE_MODEL_RELATION = "finetune"
TAGS = ["hkt", "knowledge-distillation", "hereditary-knowledge-transfer"]
TASKS = {
    "ForImageClassification": "image-classification",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForAudioClassification": "audio-classification",
    "ForQuestionAnswering": "question-answering",
}
# Trainer's eval logs that measure speed, not the model.
_SPEED_METRICS = re.compile(r"(_runtime|_per_second|_preparation_time)$")


def latest_eval_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The most recent `eval_*` entry of `trainer.state.log_history`, without the prefix and speed figures."""
    for entry in reversed(log_history):
        metrics = {
            key.removeprefix("eval_"): float(value)
            for key, value in entry.items()
            if key.startswith("eval_") and isinstance(value, (int, float)) and not _SPEED_METRICS.search(key)
        }
        if metrics:
            return metrics
    return {}


def trainer_recipe(trainer: HKTTrainer) -> dict[str, Any]:
    """The optimisation settings of a finished run, as written in the card."""
    args, state = trainer.args, trainer.state
    return {
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "learning rate": args.learning_rate,
        "weight decay": args.weight_decay,
        "lr scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup steps": args.warmup_steps,
        "batch size (total)": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "training steps": state.global_step,
        "epochs": round(state.epoch, 2) if state.epoch is not None else None,
        "seed": args.seed,
    }


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repository id such as `org/model`; false for local paths, which the Hub cannot link to."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _architecture_suffix(architecture: str | None) -> str | None:
    match = re.search(r"(For[A-Za-z]+)$", architecture or "")
    return match.group(1) if match else None


def _auto_class(suffix: str | None) -> str:
    """The transformers Auto class that loads such a model: `AutoModel<suffix>` where transformers has one (there is
    no `AutoModelForOpticalFlow`, say; built-in RAFT children register with `AutoModel`)."""
    name = f"AutoModel{suffix}" if suffix else "AutoModel"
    return name if hasattr(transformers, name) else "AutoModel"


def _metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    return {key.removeprefix("eval_"): float(value) for key, value in (metrics or {}).items()}


def _metric_rows(child: dict[str, float], parent: dict[str, float]) -> list[tuple[str, str, str]]:
    """Rows (metric, child, parent) of the card's results table; '-' where one side was not measured."""
    names = list(child) + [name for name in parent if name not in child]
    return [(name, *(f"{side[name]:.4f}" if name in side else "-" for side in (child, parent))) for name in names]


def render_model_card(
    hkt_config: HKTConfig,
    model_name: str,
    *,
    dataset: str | None = None,
    child_metrics: Mapping[str, float] | None = None,
    parent_metrics: Mapping[str, float] | None = None,
    training_recipe: Mapping[str, Any] | None = None,
    task: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The child's model card: Hub metadata (lineage, dataset, `model-index` of the child's metrics) and a body with
    the HKT settings, child and parent metrics, the training recipe and the citation of the HKT paper.

    Metrics are never invented: `child_metrics` / `parent_metrics` are what the caller measured (keys may keep an
    `eval_` prefix). `task` defaults to the one implied by the child's architecture (e.g. image-classification).
    """
    child, parent = _metrics(child_metrics), _metrics(parent_metrics)
    suffix = _architecture_suffix(hkt_config.child_architecture)
    task = task or TASKS.get(suffix or "")
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
        tags=TAGS + [t for t in tags or [] if t not in TAGS],
        base_model=hkt_config.parent if is_hub_id(hkt_config.parent) else None,
        datasets=[dataset] if dataset else None,
        eval_results=eval_results,
        model_name=model_name,
    )
    if card_data.base_model:
        card_data["base_model_relation"] = BASE_MODEL_RELATION
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        hkt=hkt_config,
        parent_on_hub=bool(card_data.base_model),
        auto_class=_auto_class(suffix),
        dataset=dataset,
        metric_rows=_metric_rows(child, parent),
        recipe=[(key, value) for key, value in (training_recipe or {}).items() if value is not None],
    )


def check_child_folder(folder: str | os.PathLike) -> Path:
    """Refuse a folder that is not a plain saved child: no config, no weights, no lineage, or aligner/gate weights."""
    folder = Path(folder)
    for name in ("config.json", HKT_CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}. Save the child with `HKTTrainer.save_model(folder)` (which writes the plain "
                "child and hkt_config.json) before pushing it."
            )
    weights = sorted(folder.glob("model*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} has no model*.safetensors weights; save the child with safetensors.")
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            if any(key.startswith(f"{ADAPTER_NAME}.") for key in f.keys()):
                raise ValueError(
                    f"{path} holds HKT aligner/gate weights ({ADAPTER_NAME}.*): it is a training checkpoint, not a "
                    "plain child. Push the folder written by `trainer.save_model(folder)` after training."
                )
    return folder


def push_child(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload HKT child",
    run_as_future: bool = False,
    **card_info: Any,
):
    """Push an already-saved child to the Hub: its weights, config, processor files, `hkt_config.json` and a model
    card written to `folder/README.md` (from `render_model_card(**card_info)`). Nothing else in the folder goes.

    Returns the `CommitInfo` of `upload_folder` (a `Future` of it with `run_as_future=True`).
    """
    folder = check_child_folder(folder)
    hkt_config = HKTConfig.from_json_file(folder / HKT_CONFIG_NAME)
    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    model_name = card_info.pop("model_name", None) or repo_id
    render_model_card(hkt_config, model_name, **card_info).save(folder / "README.md")
    return upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=CHILD_FILES,
        commit_message=commit_message,
        token=token,
        revision=revision,
        run_as_future=run_as_future,
    )


def trainer_card_info(trainer: HKTTrainer, **card_info: Any) -> dict[str, Any]:
    """Card inputs known to a trainer (latest eval metrics, recipe), overridden by the caller's `card_info`."""
    return {
        "child_metrics": latest_eval_metrics(trainer.state.log_history),
        "training_recipe": trainer_recipe(trainer),
        **card_info,
    }


def trainer_model_name(trainer: HKTTrainer) -> str:
    """The repository a trainer pushes to: `args.hub_model_id`, else the output folder's name (as `Trainer`)."""
    return trainer.hub_model_id or trainer.args.hub_model_id or Path(trainer.args.output_dir).absolute().name


def push_trainer(
    trainer: HKTTrainer,
    commit_message: str = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    **card_info: Any,
):
    """`HKTTrainer.push_to_hub`: save the child (every process, as `Trainer`), then push it from process zero.

    Saved as `Trainer.push_to_hub` does (`_internal_call=True`: a user call would push again when
    `args.push_to_hub` is set). After `train()` the adapter is detached, so this writes the plain child;
    `check_child_folder` refuses the push otherwise.
    """
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    trainer.save_model(_internal_call=True)
    if not trainer.is_world_process_zero():
        return None
    trainer._finish_current_push()
    return push_child(
        args.output_dir,
        trainer_model_name(trainer),
        token=token if token is not None else args.hub_token,
        private=private if private is not None else args.hub_private_repo,
        revision=revision if revision is not None else args.hub_revision,
        commit_message=commit_message,
        run_as_future=not blocking,
        **trainer_card_info(trainer, **card_info),
    )


def load_lineage(repo_id_or_dir: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> HKTConfig:
    """The `HKTConfig` of a child, from a local folder or a Hub repository (`hf_hub_download`, so the cache and
    `HF_HUB_OFFLINE` apply). `hub_kwargs` go to `hf_hub_download` (e.g. `token`, `cache_dir`)."""
    local = Path(repo_id_or_dir)
    if local.is_dir():
        path = local / HKT_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{local} has no {HKT_CONFIG_NAME}: it is not a child saved by hkt-hf.")
    else:
        try:
            path = hf_hub_download(str(repo_id_or_dir), HKT_CONFIG_NAME, revision=revision, **hub_kwargs)
        except RemoteEntryNotFoundError as err:
            raise FileNotFoundError(
                f"{repo_id_or_dir} has no {HKT_CONFIG_NAME}: it was not pushed by hkt-hf, so its lineage is unknown."
            ) from err
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                f"{repo_id_or_dir}: {HKT_CONFIG_NAME} is not in the local cache and the Hub cannot be reached (offline "
                "mode or no connection). Download the child while online first, or pass its local folder."
            ) from err
    return HKTConfig.from_json_file(path)


def format_lineage(cfg: HKTConfig) -> str:
    """A few readable lines on where a child comes from and how it was trained."""
    parent = cfg.parent or "unrecorded"
    revision = f" @ {cfg.parent_revision}" if cfg.parent_revision else " (revision not pinned)"
    kd = f"{cfg.kd_loss}, weight {cfg.kd_weight}, temperature {cfg.kd_temperature}" if cfg.kd_weight else "off"
    weights = ", ".join(f"{w:g}" for w in cfg.loss_weights)
    return "\n".join(
        [
            f"HKT child ({cfg.child_architecture or 'architecture unrecorded'})",
            f"  parent:       {parent}{revision} (mode: {cfg.parent_mode})",
            f"  carriers:     {', '.join(cfg.carriers)}",
            f"  gate:         {cfg.gate}, lambda {cfg.lam:g}",
            f"  loss weights: {weights} (native, child-mixed, parent-head)",
            f"  classic KD:   {kd}",
        ]
    )
