"""model.channels_last: NHWC weights and backbone input, the same losses and gradients."""
import pytest
import torch

from models import ModelConfig, build_model
from tests.models.synthetic import NUM_CLASSES, make_batch, make_target

SMALL = dict(fpn_channels=64, semantic_channels=64, fcos_num_convs=2, mask_head_convs=2, keypoint_head_convs=2,
             backbone_norm="group_norm")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _model(channels_last: bool):
    torch.manual_seed(0)
    return build_model(ModelConfig(**SMALL, channels_last=channels_last), num_classes=NUM_CLASSES)


def test_channels_last_layout_and_same_losses_and_gradients():
    plain, nhwc = _model(False), _model(True)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not plain.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    nhwc.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    batch = make_batch([make_target(0, height=64, width=64), make_target(1, height=64, width=64)])
    a, b = plain(batch).losses, nhwc(batch).losses
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    for task in a:
        torch.testing.assert_close(b[task], a[task], rtol=1e-4, atol=1e-5)
    sum(a.values()).backward()
    sum(b.values()).backward()
    # Same gradient up to summation order (NHWC kernels add in another order): compare norms.
    got, want = nhwc.backbone.body.conv1.weight.grad, plain.backbone.body.conv1.weight.grad
    assert (got - want).norm() <= 1e-3 * want.norm()


def test_channels_last_predicts_the_same():
    plain, nhwc = _model(False).eval(), _model(True).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(plain.predict(images), nhwc.predict(images)):
        assert a.keys() == b.keys()
        for key in ("semantic_logits", "class_logits"):
            if key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
