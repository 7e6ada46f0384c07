"""`target="contrast"` of the gradient methods: each prompt's logit minus the log-sum-exp of the other prompts' logits
of the call, checked against plain autograd on tiny random models; batching over images with the same prompts; the
one-prompt fallback to the logit."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import pixels, scaled, tiny_model, token_ids

CONTRAST_METHODS = [("vit", "relevance"), ("vit", "gradcam"), ("vit", "legrad"), ("resnet", "relevance"),
                    ("resnet", "gradcam")]  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return {backbone: tiny_model(backbone) for backbone in ("vit", "resnet")}


def contrast(logits: torch.Tensor, i: int, t: int) -> torch.Tensor:
    """y_it - logsumexp_{j != t} y_ij, differentiable."""
    others = [j for j in range(logits.shape[1]) if j != t]
    return logits[i, t] - torch.logsumexp(logits[i, others], dim=0)


def other_weights(logits: torch.Tensor, i: int, t: int) -> torch.Tensor:
    """softmax_{j != t}(y_ij) as a row over all prompts (0 at t), detached."""
    weights = torch.zeros(logits.shape[1])
    others = [j for j in range(logits.shape[1]) if j != t]
    weights[others] = logits[i, others].detach().softmax(dim=0)
    return weights


def plain_forward(model, images, texts, hidden=False):
    clone = copy.deepcopy(model)
    out = clone(input_ids=texts, pixel_values=images, output_attentions=True, output_hidden_states=hidden)
    return clone, out


@pytest.mark.parametrize("start_layer", [0, -1])
def test_vit_relevance_contrast_is_chefer_of_the_contrastive_target(models, start_layer):
    model = models["vit"]
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    result = model.explain(images, texts, method="relevance", start_layer=start_layer, target="contrast")
    logit_maps = model.explain(images, texts, method="relevance", start_layer=start_layer)
    for i in range(2):
        for t in range(3):
            _, out = plain_forward(model, images, texts)
            attentions = out.vision_model_output.attentions
            first = start_layer % len(attentions)
            grads = torch.autograd.grad(contrast(out.logits_per_image, i, t), attentions[first:])
            size = attentions[0].shape[-1]
            relevance = torch.eye(size)
            for weights, grad in zip(attentions[first:], grads, strict=True):
                cam = (grad[i] * weights[i].detach()).clamp(min=0).mean(dim=0)  # [N, N]
                relevance = relevance + cam @ relevance
            expected = scaled(relevance[0, 1:])
            torch.testing.assert_close(result.image_maps[i, t].flatten(), expected, atol=1e-5, rtol=1e-4)
    # the other prompts' logits do not depend on this prompt's tokens: the text maps are the logit's
    torch.testing.assert_close(result.text_maps, logit_maps.text_maps)
    assert not torch.allclose(result.image_maps, logit_maps.image_maps)


def test_resnet_relevance_contrast_is_the_pool_cam_of_the_contrastive_target(models):
    model = models["resnet"]
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    result = model.explain(images, texts, method="relevance", target="contrast")
    for i in range(2):
        for t in range(3):
            _, out = plain_forward(model, images, texts)
            pool = out.vision_model_output.attentions[0]  # [I, heads, 1, 1 + h*w]
            (grad,) = torch.autograd.grad(contrast(out.logits_per_image, i, t), pool)
            expected = scaled((grad[i] * pool[i].detach()).clamp(min=0).mean(dim=0)[0, 1:])
            torch.testing.assert_close(result.image_maps[i, t].flatten(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_gradcam_contrast_subtracts_the_softmax_weighted_other_scores(models, backbone):
    """Grad-CAM's score s_it = image_features_i . unit text_t; the contrast explains s_it - sum_j w_j s_ij with w the
    softmax of the other prompts' logits."""
    model = models[backbone]
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    result = model.explain(images, texts, method="gradcam", target="contrast")
    for i in range(2):
        for t in range(3):
            clone, out = plain_forward(model, images, texts, hidden=True)
            vision = out.vision_model_output
            scores = clone.vision_model.project(vision.pooler_output) @ out.text_embeds.detach().t()  # [I, T]
            target = scores[i, t] - scores[i] @ other_weights(out.logits_per_image, i, t)
            if backbone == "resnet":
                features = vision.last_hidden_state  # [I, C, h, w]
                (grad,) = torch.autograd.grad(target, features)
                image = (grad[i].mean(dim=(1, 2))[:, None, None] * features[i]).sum(0).flatten()
            else:
                tokens = vision.hidden_states[-2]  # [I, 1 + gh*gw, D]
                (grad,) = torch.autograd.grad(target, tokens)
                image = tokens[i, 1:] @ grad[i, 1:].mean(0)
            expected = scaled(image.detach())
            torch.testing.assert_close(result.image_maps[i, t].flatten(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone,method", CONTRAST_METHODS)
def test_same_prompts_batched_equal_one_image_at_a_time(models, backbone, method):
    """The contrast depends on the prompt set (documented), so batching is checked with the same prompts per image."""
    model = models[backbone]
    images, texts = pixels(3, model.config.vision_config.image_size), token_ids(3)
    result = model.explain(images, texts, method=method, target="contrast")
    for i in range(3):
        single = model.explain(images[i : i + 1], texts, method=method, target="contrast")
        torch.testing.assert_close(single.image_maps[0], result.image_maps[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(single.text_maps[0], result.text_maps[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone,method", CONTRAST_METHODS)
def test_one_prompt_falls_back_to_the_logit(models, backbone, method):
    model = models[backbone]
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    for t in range(3):
        contrasted = model.explain(images, texts[t : t + 1], method=method, target="contrast")
        plain = model.explain(images, texts[t : t + 1], method=method)
        torch.testing.assert_close(contrasted.image_maps, plain.image_maps)
        torch.testing.assert_close(contrasted.text_maps, plain.text_maps)


def test_the_map_depends_on_the_other_prompts(models):
    model = models["vit"]
    images, texts = pixels(1, model.config.vision_config.image_size), token_ids(3)
    three = model.explain(images, texts, method="relevance", start_layer=0, target="contrast").image_maps[0, 0]
    two = model.explain(images, texts[:2], method="relevance", start_layer=0, target="contrast").image_maps[0, 0]
    assert not torch.allclose(three, two)


def min_max(x: torch.Tensor) -> torch.Tensor:
    """A map as LeGrad scales it: shifted and divided to [0, 1] (a flat map becomes 0)."""
    spread = x.max() - x.min()
    return (x - x.min()) / spread if spread > 0 else torch.zeros_like(x)


@pytest.mark.parametrize("start_layer", [-1, -2])
def test_vit_legrad_contrast_is_legrad_of_the_contrastive_scores(models, start_layer):
    """Per layer l, s_l[i, j] = cos(project(ln_post(mean over tokens of block l's output)), prompt j); the contrast
    explains s_l[i, k] - sum_j softmax_{j != k}(logits[i, j]) s_l[i, j] by its gradient w.r.t. A_l alone (ReLU, mean
    over heads and query rows), summed over layers: by plain autograd through an ordinary forward."""
    model = models["vit"]
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    result = model.explain(images, texts, method="legrad", start_layer=start_layer, target="contrast")
    for i in range(2):
        for t in range(3):
            clone, out = plain_forward(model, images, texts, hidden=True)
            vision = out.vision_model_output
            weights = other_weights(out.logits_per_image, i, t)
            first = start_layer % len(vision.attentions)
            image = 0
            for layer in range(first, len(vision.attentions)):
                block_out = vision.hidden_states[layer + 1]  # [I, N, D]: the output of block `layer`
                features = F.normalize(
                    clone.vision_model.project(clone.vision_model.ln_post(block_out.mean(1))), dim=-1
                )
                scores = features @ out.text_embeds.detach().t()  # [I, T]
                target = scores[i, t] - scores[i] @ weights
                (grad,) = torch.autograd.grad(target, vision.attentions[layer], retain_graph=True)  # [I, h, N, N]
                image = image + grad[i].clamp(min=0).mean(dim=(0, 1))[1:]  # [gh*gw]
            expected = min_max(image)
            torch.testing.assert_close(result.image_maps[i, t].flatten(), expected, atol=1e-5, rtol=1e-4)


def test_legrad_contrast_is_finite_and_differs_from_the_logit(models):
    model = models["vit"]
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    contrasted = model.explain(images, texts, method="legrad", target="contrast")
    plain = model.explain(images, texts, method="legrad")
    assert torch.isfinite(contrasted.image_maps).all() and (contrasted.image_maps >= 0).all()
    assert not torch.allclose(contrasted.image_maps, plain.image_maps)
    torch.testing.assert_close(contrasted.text_maps, plain.text_maps)


@pytest.mark.parametrize("backbone,method", CONTRAST_METHODS)
def test_an_unknown_target_names_the_valid_ones(models, backbone, method):
    model = models[backbone]
    images, texts = pixels(1, model.config.vision_config.image_size), token_ids(2)
    with pytest.raises(ValueError, match=re.escape("`target`='softmax' is not valid here; valid values: 'logit'")):
        model.explain(images, texts, method=method, target="softmax")


def test_unit_helpers_agree(models):
    """`contrast`'s gradient w.r.t. the logits is e_t - other_weights: the two test helpers describe one target."""
    logits = torch.randn(2, 3, requires_grad=True)
    for i in range(2):
        for t in range(3):
            (grad,) = torch.autograd.grad(contrast(logits, i, t), logits)
            expected = F.one_hot(torch.tensor(t), 3).float() - other_weights(logits, i, t)
            torch.testing.assert_close(grad[i], expected)
            assert (grad[1 - i] == 0).all()
