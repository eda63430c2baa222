"""`hkt-hf push FOLDER REPO_ID`: share a trained child on the Hugging Face Hub, with an HKT model card."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .common import PROG, CliError, Command, positional


@dataclass
class PushOptions:
    folder: str = positional("FOLDER", "a child saved by `hkt-hf train` or trainer.save_model()")
    repo_id: str = positional("REPO_ID", "the Hub repository, e.g. your-name/hkt-resnet20 (created if needed)")
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to (default: main)"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one `hf auth login` stored)"})
    dataset: str | None = field(default=None, metadata={"help": "dataset id to name in the model card"})
    license: str | None = field(default=None, metadata={"help": "license id for the model card, e.g. apache-2.0"})
    commit_message: str = field(default="Upload HKT child", metadata={"help": "the commit message on the Hub"})


def saved_metrics(folder: Path) -> dict[str, dict[str, float]]:
    """Child and parent metrics `hkt-hf train` saved in eval_results.json, for the model card."""
    path = folder / "eval_results.json"
    if not path.is_file():
        return {}
    metrics = {k.removeprefix("eval_"): v for k, v in json.loads(path.read_text()).items()
               if isinstance(v, (int, float))}
    return {
        "child_metrics": {k: v for k, v in metrics.items() if not k.startswith("parent_")},
        "parent_metrics": {k.removeprefix("parent_"): v for k, v in metrics.items() if k.startswith("parent_")},
    }


def run(options: PushOptions) -> int:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from hkt_hf.hub import push_child

    folder = Path(options.folder)
    if not folder.is_dir():
        raise CliError(f"No folder at {folder}. Pass the output folder of `{PROG} train` (its --output_dir).")
    try:
        info = push_child(folder, options.repo_id, token=options.token, private=options.private or None,
                          revision=options.revision, commit_message=options.commit_message, dataset=options.dataset,
                          license=options.license, **saved_metrics(folder))
    except (FileNotFoundError, ValueError) as err:  # not a plain child folder, or a malformed repo id
        hint = " Repository ids look like your-name/model-name." if isinstance(err, HFValidationError) else ""
        raise CliError(f"{err}{hint}") from err
    except (HfHubHTTPError, OSError) as err:  # refused by the Hub, bad token, no connection
        raise CliError(f"The Hub refused or could not be reached: {type(err).__name__}: {err}\n"
                       "Check your connection and token (`hf auth login`, or --token).") from err
    print(f"Pushed {folder} to {info.commit_url}")
    return 0


COMMAND = Command(
    name="push",
    summary="share a trained child on the Hugging Face Hub, with an HKT model card",
    description="""
Upload a saved child to the Hugging Face Hub: weights, config, image processor or tokenizer, hkt_config.json and a
model card naming the parent, the HKT settings and the measured top-1 of child and parent (from the folder's
eval_results.json, written by `hkt-hf train`). Checkpoints, optimizer states and the training-only aligners and
gates stay local. Log in first with `hf auth login` (or pass --token).""",
    examples="""
examples:
  hkt-hf push hkt-resnet20 your-name/hkt-resnet20 --dataset uoft-cs/cifar10 --license apache-2.0
  hkt-hf push hkt-resnet20 your-org/hkt-resnet20 --private --revision experiments""",
    options=(PushOptions,),
    run=run,
)
