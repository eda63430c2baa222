"""Causal language modelling with HKT: a small Llama-style child learns Python source from a larger Llama parent.

A transformers causal-LM training script with the two-name swap (`HKTTrainer`, `HKTTrainingArguments`). The corpus
is CPython's standard library (`--data_dir`, default ../shared/data/python-stdlib beside the repository: parquet
files with a `text` column). Without `--parent`, a byte-level BPE tokenizer and a parent are first trained from
scratch with the plain `Trainer` and cached under `<output_dir>/cache`. The child has a third of the parent's layers
and half its width; it is trained twice from the same initialisation, data order and recipe: alone (plain `Trainer`)
and with HKT (default carrier: the input of the LM head on both sides). The script reports the validation perplexity
of both, saves the HKT child with its tokenizer, reloads it with `AutoModelForCausalLM` and generates from it.

    python examples/language_modeling.py --output_dir lm-child --max_steps 300 --per_device_train_batch_size 16 \
        --learning_rate 1e-3 --hkt_carriers lm_head:input=lm_head:input
    python examples/language_modeling.py --parent path/to/parent --output_dir lm-child --max_steps 300
    python examples/language_modeling.py --quick --output_dir /tmp/lm-quick     # CI, tiny sizes, < 45 s on 2 cores
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The task (corpus, tokenizer, blocks, models, cached parent) is defined once, by the language-model benchmark.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lm_task import (  # noqa: E402
    DATA_DIR,
    FULL_SIZES,
    HEAD_CARRIER,
    RECIPE,
    LMSizes,
    child_config,
    new_model,
    perplexity,
    prepare,
)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments  # noqa: E402

QUICK = LMSizes(vocab_size=500, block_size=64, parent_layers=2, parent_hidden=64, parent_heads=2, parent_steps=30,
                batch_size=16, lr=3e-3, train_rows=100, eval_rows=3)
# The child's recipe in --quick mode (every value can still be overridden on the command line).
QUICK_ARGS = dict(max_steps=20, per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=5,
                  hkt_carriers=[HEAD_CARRIER])
PROMPT = "def "


@dataclass
class ScriptArguments:
    data_dir: str = field(default=str(DATA_DIR), metadata={"help": "folder of {train,validation,test}.parquet"})
    parent: str | None = field(default=None, metadata={
        "help": "a save_pretrained folder of a Llama causal LM with its tokenizer; default: train one (cached)"})
    quick: bool = field(default=False, metadata={"help": "tiny tokenizer, models, data and steps (CI smoke run)"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    defaults = {**RECIPE, **(QUICK_ARGS if "--quick" in argv else {})}
    parser = HfArgumentParser((ScriptArguments, HKTTrainingArguments))
    parser.set_defaults(**defaults)
    script, args = parser.parse_args_into_dataclasses(args=argv)
    # The child-alone baseline: the same flags as plain TrainingArguments (the --hkt_* ones are left over).
    plain_parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    plain_parser.set_defaults(**{k: v for k, v in defaults.items() if not k.startswith("hkt_")})
    _, plain_args, _ = plain_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    plain_args.output_dir = f"{args.output_dir}/alone"

    sizes = QUICK if script.quick else FULL_SIZES
    tokenizer, data, parent, _ = prepare(script.data_dir, sizes, Path(args.output_dir) / "cache", script.parent)
    initial = new_model(child_config(parent.config), seed=args.seed)
    common = dict(eval_dataset=data["validation"], data_collator=default_data_collator, processing_class=tokenizer)
    alone = Trainer(copy.deepcopy(initial), plain_args, train_dataset=data["train"], **common)
    results = {"parent": perplexity(Trainer(parent, plain_args, **common).evaluate()),
               "child before training": perplexity(alone.evaluate())}
    alone.train()
    hkt = HKTTrainer(initial, args, train_dataset=data["train"], parent_model=parent, **common)
    hkt.train()
    results["child alone (plain Trainer)"] = perplexity(alone.evaluate())
    results["child with HKT (HKTTrainer)"] = perplexity(hkt.evaluate())
    hkt.save_model()  # the plain child + tokenizer + hkt_config.json

    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    prompt = reloaded_tokenizer(PROMPT, return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False,
                                  pad_token_id=reloaded_tokenizer.pad_token_id)
    sample = reloaded_tokenizer.decode(generated[0], skip_special_tokens=True)
    print("validation perplexity:")
    for name, value in results.items():
        print(f"  {name:28s} {value:10.2f}")
    print(f"the saved HKT child, reloaded, continues {PROMPT!r}: {sample!r}")
    summary = {"validation_perplexity": results, "sample": sample}
    Path(args.output_dir, "lm_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
