"""A tiny BERT classifier built from a config (no download) with a peft LoRA adapter, shared by the
adapter tests and the DDP adapter script."""

from __future__ import annotations

import math

import peft
import torch
import transformers
from torch import Tensor, nn

from lightning_swag import SWAGPosterior

VOCAB, LABELS = 40, 3


def base_bert(seed: int = 5) -> nn.Module:
    """The frozen base: a 2-layer BERT classifier, the same weights for a seed (on every process)."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def lora_model(seed: int = 5, move_lora_b: bool = False) -> nn.Module:
    """``base_bert(seed)`` with a rank-2 LoRA adapter on ``query``/``value`` and a trained copy of the
    classifier (``modules_to_save``). peft starts ``lora_B`` at zero; ``move_lora_b`` draws it, so that
    every adapter tensor matters from the start."""
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0, modules_to_save=["classifier"]
    )
    base = base_bert(seed)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(base, config)
    if move_lora_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
    return model


def explicit_linearized_probit(module: nn.Module, post: SWAGPosterior, batch: dict, scale: float) -> Tensor:
    """The probit-linearised probabilities from an explicit Jacobian (``torch.func.jacrev`` of the model's
    logits with respect to the adapter weights at their SWA mean), written out from the formula."""
    mean = post.unflatten(post.mean)
    params = {n: t.to(module.get_parameter(n).dtype) for n, t in mean.items()}

    def logits(weights: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(module, weights, args=(), kwargs=batch)

    with torch.no_grad():
        mu = logits(params)
    jac = torch.func.jacrev(logits)(params)  # {name: [B, C, *shape]}
    flat = torch.cat([jac[n].reshape(*mu.shape, -1) for n in post.param_shapes], dim=-1).double()
    variance = (flat.square() * post.variance.double()).sum(-1)
    variance = variance + (flat @ post.deviations.double().T).square().sum(-1) / (post.rank - 1)
    return torch.softmax(mu.double() / (1 + math.pi / 8 * scale * variance).sqrt(), dim=-1)
