"""`hkt-hf import-checkpoint SRC OUT_DIR`: a reference CIFAR ResNet checkpoint as a transformers model folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import PROG, CliError, Command, positional


@dataclass
class ImportCheckpointOptions:
    src: str = positional("SRC", "reference checkpoint file (*.th or *.pth) with a 'state_dict'")
    out_dir: str = positional("OUT_DIR", "folder to write (created if needed; files are overwritten)")
    allow_pickle: bool = field(default=False, metadata={
        "help": "unpickle arbitrary Python objects when the safe tensor-only loader refuses the file; only for files "
        "whose origin you trust"})


def run(options: ImportCheckpointOptions) -> int:
    from ..models.cifar_resnet.convert_reference_checkpoint import import_checkpoint

    try:
        model = import_checkpoint(options.src, options.out_dir, allow_pickle=options.allow_pickle)
    except FileNotFoundError as err:
        raise CliError(f"{err} Pass the path of an existing *.th or *.pth file as SRC.") from err
    except ValueError as err:
        raise CliError(str(err)) from err
    out_dir = Path(options.out_dir).resolve()
    print(f"Imported {options.src}: CIFAR ResNet depth {model.config.depth}, {model.num_parameters():,} parameters, "
          f"{model.config.num_labels} labels.")
    print(f"Saved to {out_dir} ({', '.join(sorted(p.name for p in out_dir.iterdir()))}).")
    print(f"Evaluate it with: {PROG} evaluate --model {options.out_dir} --dataset DATASET")
    return 0


COMMAND = Command(
    name="import-checkpoint",
    summary="convert a reference CIFAR ResNet checkpoint (*.th/*.pth) into a transformers model folder",
    description="""
Convert a reference CIFAR ResNet checkpoint (the public `resnet20-12fca82f.th` family, or an HKT `*.pth`) into a
`save_pretrained` folder: model.safetensors, config.json and preprocessor_config.json (32x32, ImageNet mean/std).
The depth (6n+2) is inferred from the weights. The folder then loads anywhere with
`AutoModelForImageClassification.from_pretrained(OUT_DIR)` once `hkt_hf` is imported, and works with
`hkt-hf evaluate` and `pipeline("image-classification", model=OUT_DIR)`.""",
    examples="""
examples:
  hkt-hf import-checkpoint resnet20-12fca82f.th models/resnet20
  hkt-hf import-checkpoint hkt-resnet20.pth models/hkt-resnet20
  hkt-hf evaluate --model models/resnet20 --dataset data/cifar10""",
    options=(ImportCheckpointOptions,),
    run=run,
)
