"""save_pretrained -> AutoModel.from_pretrained(trust_remote_code=True) in a fresh process, as Hub users load it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from modeling_clipviz import CLIPVizModel
from tests.helpers import pixels, tiny_config, tiny_model, token_ids

LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel
    folder, inputs_path, outputs_path, implementation = sys.argv[1:5]
    model, info = AutoModel.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True, attn_implementation=implementation
    )
    model.eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    torch.save(
        {
            "module": type(model).__module__,
            "implementation": model.config._attn_implementation,
            "info": {k: sorted(map(str, v)) for k, v in info.items()},
            "logits": out.logits_per_image,
            "attentions": out.vision_model_output.attentions + out.text_model_output.attentions,
        },
        outputs_path,
    )
    """
)


def load_in_fresh_process(folder, inputs, tmp_path, implementation="sdpa"):
    """Load the folder with transformers' remote-code path in a new interpreter, outside the repository."""
    inputs_path, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_path)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    args = [sys.executable, "-c", LOAD_SCRIPT, str(folder), str(inputs_path), str(outputs_path), implementation]
    subprocess.run(args, check=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return torch.load(outputs_path)


def inputs_for(model):
    return {"input_ids": token_ids(2), "pixel_values": pixels(2, model.config.vision_config.image_size)}


def reference_outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return out.logits_per_image, out.vision_model_output.attentions + out.text_model_output.attentions


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_fresh_process_remote_code_load(backbone, implementation, tmp_path):
    model = tiny_model(backbone)
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    saved = sorted(p.name for p in folder.iterdir())
    assert saved == [
        "config.json",
        "configuration_clipviz.py",
        "explaining_clipviz.py",
        "model.safetensors",
        "modeling_clipviz.py",
    ]
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_clipviz.CLIPVizConfig",
        "AutoModel": "modeling_clipviz.CLIPVizModel",
        "AutoModelForZeroShotImageClassification": "modeling_clipviz.CLIPVizModel",
    }

    inputs = inputs_for(model)
    logits, attentions = reference_outputs(model, inputs)
    loaded = load_in_fresh_process(folder, inputs, tmp_path, implementation)
    assert loaded["module"].startswith("transformers_modules.")  # the Hub remote-code path, not our checkout
    assert loaded["implementation"] == implementation
    assert all(not keys for name, keys in loaded["info"].items() if name != "error_msgs"), loaded["info"]
    torch.testing.assert_close(loaded["logits"], logits, atol=1e-6, rtol=0)
    for x, y in zip(loaded["attentions"], attentions, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_sharded_save_reloads_identically(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("resnet")
    config.text_config.vocab_size = 49408  # OpenAI's vocabulary: a 12.6 MB embedding, so there is something to shard
    model = CLIPVizModel(config).eval()
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    reloaded, info = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    inputs = inputs_for(model)
    torch.testing.assert_close(reloaded.eval()(**inputs).logits_per_image, reference_outputs(model, inputs)[0])


def test_auto_classes_and_dtype(tmp_path):
    model = tiny_model("vit")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.model_type == "clipviz" and config.vision_config.backbone == "vit"
    zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(zero_shot).__name__ == "CLIPVizModel"
    for dtype in (torch.float16, torch.bfloat16):
        half = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=dtype).eval()
        assert half.dtype == dtype
        out = half(**inputs_for(model), output_attentions=True)
        assert out.logits_per_image.dtype == dtype and torch.isfinite(out.logits_per_image.float()).all()
