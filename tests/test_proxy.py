"""One real check on real photos: the CIFAR-10 proxy (JPEG quality 75) through the real loader.

About 4 to 5 minutes on a 2-core CPU in fp32: the most expensive test of the suite.
"""
import pytest

from cifar_onecycle import Recipe, train


@pytest.mark.slow
def test_one_epoch_on_10000_proxy_images_learns(proxy_dir, tmp_path):
    # Batch 256 gives 39 steps (batch 512 would give only 19); the DAWNBench logit scale keeps so
    # short a warm-up stable. Measured here: 45.9% test accuracy on the 5,000 proxy test images.
    recipe = Recipe(epochs=1, peak_epoch=0.25, train_subset=10_000, batch_size=256, logit_scale=0.125,
                    lr_max=0.2, device="cpu")
    result = train(recipe, data_dir=proxy_dir, download=False, out=tmp_path / "run", progress=False)
    assert result.summary["train_images"] == 10_000 and result.summary["test_images"] == 5_000
    assert result.final_test_acc >= 0.35  # chance is 0.10
