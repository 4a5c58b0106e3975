"""Guards for the performance fixes: the cheap checks still catch what they must."""

import pytest
import torch

from icl_lens.finetune import _finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_divergence_check_sees_nan_and_inf_in_strided_weights(bad):
    joint = torch.randn(8, 24)
    k_view = joint[:, 8:16].t()  # a K weight sliced out of a joint QKV weight
    params = [torch.randn(3), k_view, torch.zeros(0)]
    assert _finite(params)
    k_view[2, 5] = bad
    assert not _finite(params)
    assert _finite([])
