"""The causal language-modelling example runs end to end in --quick mode on the shared python-stdlib corpus: the
HKT child it saves reloads with AutoModelForCausalLM, generates, carries its lineage, and training improved it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import EXAMPLES, SHARED
from transformers import AutoModelForCausalLM, AutoTokenizer

CORPUS = SHARED / "data" / "python-stdlib"


@pytest.mark.skipif(not (CORPUS / "train.parquet").is_file(),
                    reason=f"needs the python-stdlib corpus in ../shared ({CORPUS}), absent here")
def test_language_modeling_quick_trains_saves_and_generates(tmp_path):
    out = tmp_path / "lm-child"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "language_modeling.py"), "--quick", "--output_dir",
                           str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "child with HKT (HKTTrainer)" in proc.stdout and "child alone (plain Trainer)" in proc.stdout

    perplexity = json.loads((out / "lm_results.json").read_text())["validation_perplexity"]
    assert perplexity["child with HKT (HKTTrainer)"] < perplexity["child before training"]
    assert (out / "hkt_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32  # the child, not the parent
    assert not any("hkt" in name for name in model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("import ", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert torch.equal(generated[0, : prompt["input_ids"].shape[1]], prompt["input_ids"][0])
