"""OpenAI's own CLIP code (PyPI ``openai-clip``) as the tests' oracle: its tokenizer, and its model with random
weights. Loading by file path is ``clipviz.openai_clip``'s (the ``clip`` package ``__init__`` imports torchvision).
"""

from clipviz.openai_clip import load_openai_clip_file, openai_clip_args, openai_model_module, set_vision_heads


def openai_tokenizer_module():
    """OpenAI's ``clip/simple_tokenizer.py`` as a module named ``openai_clip_tokenizer``."""
    return load_openai_clip_file("simple_tokenizer.py", "openai_clip_tokenizer")


def randomized_openai_clip(config, seed: int = 0):
    """OpenAI's CLIP for this architecture, eval mode, with every parameter and BatchNorm statistic random.

    OpenAI's own initialization zeroes biases and the last BatchNorm of every ResNet block, which would hide
    mistakes in those paths; small random offsets make every tensor matter.
    """
    import torch

    torch.manual_seed(seed)
    model = openai_model_module().CLIP(*openai_clip_args(config)).eval()
    set_vision_heads(model, config.vision_config.num_attention_heads)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and name != "visual.class_embedding":
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model
