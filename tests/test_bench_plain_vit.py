"""bench/plain_vit.py, the MFU reference of bench.train_step: XLA's FLOP count agrees with the analytic one."""

import pytest

from bench import plain_vit


@pytest.mark.parametrize('kwargs', [dict(width=64, depth=2, heads=2, patch=8, classes=10)])
def test_flops_match_analytic_count(kwargs):
  r = plain_vit.time_fwd_bwd(batch_size=2, steps=1, img=32, **kwargs)
  expected = plain_vit.analytic_gflops(2, img=32, **{k: v for k, v in kwargs.items() if k != 'heads'})
  assert r['step_s'] > 0
  # XLA also counts LayerNorm, softmax and GELU: a little above the matmuls (+0.5 % here, +0.3 % for ViT-S b8).
  assert expected <= r['gflops'] <= 1.05 * expected, (r['gflops'], expected)


def test_vit_s16_count():
  """The defaults are ViT-S/16: 4.6 G multiply-adds per 224 px image forward, so ~27.6 GFLOP forward+backward."""
  assert plain_vit.analytic_gflops(1) == pytest.approx(27.6, rel=0.03)
