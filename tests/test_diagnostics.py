import math

import pytest
import torch
import torch.nn.functional as F

from unimodality import diagnostics


def test_alignment_is_mean_squared_distance_of_pairs():
    a = F.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
    expected = sum(float(((a[i] - b[i]) ** 2).sum()) for i in range(10)) / 10
    assert diagnostics.alignment(a, b).item() == pytest.approx(expected)
    assert diagnostics.alignment(a, a).item() == 0


def test_uniformity_matches_definition_and_orders_spread():
    x = F.normalize(torch.randn(12, 3, dtype=torch.float64), dim=1)
    pairs = [float(((x[i] - x[j]) ** 2).sum()) for i in range(12) for j in range(12) if i != j]
    expected = math.log(sum(math.exp(-2 * d) for d in pairs) / len(pairs))
    assert diagnostics.uniformity(x).item() == pytest.approx(expected)
    collapsed = F.normalize(torch.ones(12, 3, dtype=torch.float64) + 1e-3 * x, dim=1)
    assert diagnostics.uniformity(collapsed) > diagnostics.uniformity(x)
    # a float32 batch of training size against Wang & Isola's own formula (pdist), in float64
    batch = F.normalize(torch.randn(256, 128), dim=1)
    reference = torch.pdist(batch.double()).pow(2).mul(-2).exp().mean().log().item()
    assert diagnostics.uniformity(batch).item() == pytest.approx(reference, abs=1e-5)


def test_modality_gap_is_centroid_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert diagnostics.modality_gap(a, a).item() == 0
    assert diagnostics.modality_gap(a, -a).item() == pytest.approx(math.sqrt(2))
