"""`import moetune` registers mpt_moe with transformers' Auto classes, whatever the import order,
without importing torch itself. Each case runs in a fresh interpreter: registration happens once."""

import subprocess
import sys

import pytest
import torch
from transformers import MptConfig, MptForCausalLM

from moetune.config import MoeConfig, UpcyclingConfig
from moetune.models.families.mpt.upcycle import upcycle_mpt

LOAD_AND_COMPARE = """
import sys, torch
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids, expected = torch.load(sys.argv[2])
with torch.no_grad():
    same = torch.equal(model(ids).logits, expected)
print(type(model).__name__, same)
"""

PRELUDES = {
    "moetune first": "import moetune, sys\nassert 'torch' not in sys.modules\nfrom transformers import AutoModelForCausalLM",
    "transformers first": "from transformers import AutoModelForCausalLM\nimport moetune",
    # Loads transformers' modeling code before the Auto classes: the hook must wait for the whole chain.
    "modeling code first": "import moetune\nfrom transformers import MptForCausalLM\nfrom transformers import AutoModelForCausalLM",
    "through peft": "import moetune\nimport peft\nfrom transformers import AutoModelForCausalLM",
}


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    dense = MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=64))
    model = upcycle_mpt(dense, MoeConfig(upcycling=UpcyclingConfig(num_experts=2, top_k=1)), generator=torch.Generator().manual_seed(0)).eval()
    model.save_pretrained(folder / "model")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save((ids, model(ids).logits), folder / "expected.pt")
    return folder


@pytest.mark.parametrize("prelude", PRELUDES.values(), ids=PRELUDES.keys())
def test_auto_model_loads_upcycled_checkpoint_after_import_moetune(upcycled, prelude):
    script = prelude + "\n" + LOAD_AND_COMPARE
    result = subprocess.run([sys.executable, "-c", script, str(upcycled / "model"), str(upcycled / "expected.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MptMoeForCausalLM", "True"]


def test_without_moetune_the_checkpoint_is_not_loadable(upcycled):
    # The control: registration, not some transformers fallback, is what makes the cases above load.
    script = "from transformers import AutoModelForCausalLM\n" + LOAD_AND_COMPARE
    result = subprocess.run([sys.executable, "-c", script, str(upcycled / "model"), str(upcycled / "expected.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "mpt_moe" in result.stderr
