import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipkit.losses import InfoNCELoss


def features(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    return a, b


@pytest.mark.parametrize("batch, dim, scale", [(8, 16, 1 / 0.07), (33, 64, 100.0), (2, 4, 1.0)])
def test_infonce_matches_open_clip_forward_and_gradient(batch, dim, scale):
    a, b = features(batch, dim, seed=batch)
    grads = []
    losses = []
    for loss_fn in (InfoNCELoss(), ClipLoss()):
        image = a.clone().requires_grad_(True)
        text = b.clone().requires_grad_(True)
        logit_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(image, text, logit_scale)
        loss.backward()
        losses.append(loss.detach())
        grads.append((image.grad, text.grad, logit_scale.grad))
    assert torch.allclose(losses[0], losses[1], atol=1e-6, rtol=0)
    for ours, theirs in zip(*grads):
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_infonce_float32_matches_open_clip():
    a, b = (t.float() for t in features(16, 32, seed=0))
    scale = torch.tensor(1 / 0.07)
    assert torch.allclose(InfoNCELoss()(a, b, scale), ClipLoss()(a, b, scale), atol=1e-6, rtol=0)


def test_infonce_known_values():
    eye = torch.eye(4)
    # Perfectly aligned pairs with a huge scale: loss ~ 0; identical features everywhere: ln(B).
    assert InfoNCELoss()(eye, eye, torch.tensor(100.0)).item() < 1e-6
    same = F.normalize(torch.ones(4, 4), dim=-1)
    assert InfoNCELoss()(same, same, torch.tensor(10.0)).item() == pytest.approx(math.log(4))
