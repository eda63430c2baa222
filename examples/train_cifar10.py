"""The paper's CIFAR-10 setting: a ResNet-56 parent passes its knowledge to a ResNet-20 child with HKT.

Both models come from the public reference checkpoints (`resnet56-4bfd9763.th`, `resnet20-12fca82f.th`, read with
`hkt_hf.apps.models.cifar_resnet.convert_reference_checkpoint.import_checkpoint`) or from save_pretrained folders / Hub ids. The recipe is the reference one:
SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 128, random crop (pad 4) + horizontal flip, ImageNet mean/std;
the carrier is the pooled feature that feeds each classifier (`--hkt_carriers auto`). Every TrainingArguments and
HKT flag works (`--num_train_epochs`, `--hkt_lambda`, `--bf16`, ...).

    python examples/train_cifar10.py --parent resnet56-4bfd9763.th --child resnet20-12fca82f.th \
        --dataset uoft-cs/cifar10 --num_train_epochs 10 --output_dir hkt-resnet20
    # CI: a strided subset and a few steps
    python examples/train_cifar10.py --parent ... --child ... --dataset data/cifar10 --quick --output_dir /tmp/q
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForImageClassification, HfArgumentParser

from hkt_hf import HKTTrainer, HKTTrainingArguments, cifar_image_processor
from hkt_hf.apps.models.cifar_resnet.convert_reference_checkpoint import import_checkpoint
from hkt_hf.apps.data.images import CIFAR10_HUB_ID, image_collator, load_image_dataset, prepare_image_dataset, strided_subset
from hkt_hf.apps.metrics import top1_accuracy

# The reference recipe, as defaults every flag can override.
REFERENCE_RECIPE = dict(
    learning_rate=0.01, optim="sgd", optim_args="momentum=0.9", weight_decay=1e-4, per_device_train_batch_size=128,
    per_device_eval_batch_size=256, lr_scheduler_type="constant", remove_unused_columns=False, report_to="none",
    save_strategy="no", logging_steps=50,
)
QUICK = dict(train_rows=256, test_rows=256, max_steps=3, per_device_train_batch_size=32)


@dataclass
class ScriptArguments:
    parent: str = field(metadata={"help": "ResNet-56 parent: a reference *.th file, a folder or a Hub id"})
    child: str = field(metadata={"help": "ResNet-20 child to start from: same forms as --parent"})
    dataset: str = field(default=CIFAR10_HUB_ID, metadata={"help": "Hub id, folder of <split>.parquet, or a file"})
    train_rows: int | None = field(default=None, metadata={"help": "strided subset of the training split"})
    test_rows: int | None = field(default=None, metadata={"help": "strided subset of the test split"})
    quick: bool = field(default=False, metadata={"help": f"CI mode: {QUICK}"})


def load_model(name: str):
    """A reference checkpoint file is imported; anything else is loaded with the Auto class."""
    if Path(name).suffix in (".th", ".pth"):
        return import_checkpoint(name)
    return AutoModelForImageClassification.from_pretrained(name)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, HKTTrainingArguments))
    parser.set_defaults(**REFERENCE_RECIPE)
    if "--quick" in (argv if argv is not None else sys.argv[1:]):
        parser.set_defaults(**QUICK)
    script, args = parser.parse_args_into_dataclasses(args=argv)

    parent, child = load_model(script.parent), load_model(script.child)
    processor = cifar_image_processor()
    raw = load_image_dataset(script.dataset)
    raw["train"] = strided_subset(raw["train"], script.train_rows)  # rows may be sorted by label: never head-slice
    raw["test"] = strided_subset(raw["test"], script.test_rows)
    data = prepare_image_dataset(raw, processor)  # crop + flip on train, plain preprocessing on test

    args.hkt_parent = script.parent  # recorded in hkt_config.json as the child's lineage
    trainer = HKTTrainer(child, args, train_dataset=data["train"], data_collator=image_collator(),
                         parent_model=parent)
    before = top1_accuracy(child, data["test"], device=args.device, progress=False)
    trainer.train()
    results = {
        "parent_top1": top1_accuracy(trainer.parent_model, data["test"], device=args.device, progress=False),
        "child_top1_before": before,
        "child_top1_after": top1_accuracy(trainer.model, data["test"], device=args.device, progress=False),
    }
    trainer.save_model()  # the plain child + hkt_config.json
    processor.save_pretrained(args.output_dir)
    trainer.save_metrics("eval", results)
    print(", ".join(f"{k} {v:.2f} %" for k, v in results.items()), f"on {len(data['test'])} test images")
    return results


if __name__ == "__main__":
    main()
