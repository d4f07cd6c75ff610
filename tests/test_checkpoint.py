"""checkpoint.py: loading lists every mismatch at once, old files are upgraded, init sources are read, and
training checkpoints carry the config digest (Orbax on local folders; gs:// is in test_fileio.py)."""

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from configs import vitb
from ovseg_jax import checkpoint
from ovseg_jax import errors
from ovseg_jax import param_tree


def _target():
  return {'enc': {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}, 'head': {'w': jnp.zeros((3, 4))},
          'scale': jnp.zeros(())}


def test_check_tree_lists_every_missing_unexpected_and_reshaped_param_in_one_line():
  loaded = {'enc': {'w': np.ones((2, 5))}, 'head': {'w': np.ones((3, 4)), 'extra': np.ones(1)},
            'other': {'x': np.ones(2)}}
  with pytest.raises(errors.UsageError) as e:
    checkpoint.check_tree(loaded, _target(), 'ckpt')
  msg = str(e.value)
  assert '\n' not in msg
  assert msg == ('ckpt does not fit the model (model config mismatch?): missing (2): enc/b, scale; '
                 'unexpected (2): head/extra, other/x; another shape (1): enc/w (2, 5) (model (2, 3))')
  # A partial init may miss params; what it holds must still fit.
  with pytest.raises(errors.UsageError) as e:
    checkpoint.check_tree(loaded, _target(), 'ckpt', allow_missing=True)
  assert 'missing' not in str(e.value) and 'head/extra' in str(e.value) and 'enc/w' in str(e.value)
  checkpoint.check_tree({'enc': {'w': np.ones((2, 3))}}, jax.eval_shape(_target), 'ok', allow_missing=True)
  checkpoint.check_tree(jax.tree.map(np.asarray, _target()), jax.eval_shape(_target), 'ok')


def test_merge_params_keeps_missing_leaves_casts_and_keeps_the_target_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  target = {'a': jax.device_put(jnp.zeros((8, 2), jnp.bfloat16), sharded), 'b': jnp.full((3,), 7.0)}
  merged = checkpoint.merge_params(target, {'a': np.arange(16, dtype=np.float32).reshape(8, 2)}, 'init',
                                   allow_missing=True)
  assert merged['a'].dtype == jnp.bfloat16 and merged['a'].sharding == sharded
  np.testing.assert_array_equal(np.asarray(merged['a'], np.float32), np.arange(16).reshape(8, 2))
  assert merged['b'] is target['b']
  with pytest.raises(errors.UsageError, match=r'teacher does not fit .*: missing \(1\): b$'):
    checkpoint.merge_params(target, {'a': np.zeros((8, 2))}, 'teacher')


def _old_vitb_model_config() -> dict:
  """config.model of configs/vitb.py as a model_config.json written before `remat` and `stem_channels`
  existed, by a version that still had the grouping experiments' switches (at their defaults)."""
  old = json.loads(vitb.get_config().model.to_json())
  del old['remat'], old['vision']['stem_channels']
  old['binding'].update(group_token_std=0.02, refine_iters=0, refine_scale=10.0, refine_init='queries',
                        query_residual=True)
  return old


def test_upgrade_fills_an_old_model_config_json(tmp_path):
  path = tmp_path / 'old'
  path.mkdir()
  (path / checkpoint.MODEL_CONFIG).write_text(json.dumps(_old_vitb_model_config()))
  upgraded = checkpoint.load_model_config(str(path))
  assert upgraded.remat == 'none' and tuple(upgraded.vision.stem_channels) == ()
  assert 'refine_iters' not in upgraded.binding and 'query_residual' not in upgraded.binding
  assert json.loads(upgraded.to_json()) == json.loads(vitb.get_config().model.to_json())
  # An up-to-date config is left as it is.
  current = tiny.get_config().model
  assert checkpoint.upgrade_model_config(ml_collections.ConfigDict(current.to_dict())).to_dict() == current.to_dict()


def test_upgrade_refuses_a_removed_switch_away_from_its_default(tmp_path):
  old = _old_vitb_model_config()
  old['binding']['refine_iters'] = 3
  path = tmp_path / 'exp'
  path.mkdir()
  (path / checkpoint.MODEL_CONFIG).write_text(json.dumps(old))
  with pytest.raises(errors.UsageError, match='model.binding.refine_iters=3 .*experiments/grouping-levers'):
    checkpoint.load_model_config(str(path))


def test_old_workdir_config_is_upgraded(tmp_path):
  old = json.loads(vitb.get_config().to_json_best_effort())
  old['model'] = _old_vitb_model_config()
  del old['data']['answer_template'], old['data']['channel_shuffle']
  old['loss'].update(group_entity_weight=0.0, group_diversity_weight=0.0)
  (tmp_path / checkpoint.CONFIG).write_text(json.dumps(old))
  config = checkpoint.load_workdir_config(str(tmp_path))
  assert json.loads(config.to_json_best_effort()) == json.loads(vitb.get_config().to_json_best_effort())


def test_read_init_of_inference_dino_and_bert_folders(tmp_path):
  mc = tiny.get_config().model
  variables = {'params': {'img_encoder': {'norm': {'scale': np.ones(4, np.float32)}},
                          'logit_scale': np.float32(2.0)},
               'batch_stats': {'img_projector': {'mean': np.zeros(3, np.float32)}}}
  teacher = {'norm': {'scale': np.full(4, 3.0, np.float32)}}
  inf = checkpoint.save_inference(str(tmp_path / 'inf'), mc, variables, {'step': 1}, teacher=teacher)
  params, stats, t = checkpoint.read_init(inf)
  assert param_tree.named_leaves(params)[0][0] == 'img_encoder/norm/scale' and float(params['logit_scale']) == 2
  np.testing.assert_array_equal(stats['img_projector']['mean'], np.zeros(3))
  np.testing.assert_array_equal(t['norm']['scale'], np.full(4, 3.0))
  np.testing.assert_array_equal(checkpoint.load_teacher(inf)['norm']['scale'], np.full(4, 3.0))

  bert = checkpoint.save_text_init(str(tmp_path / 'bert'), mc.text, {'embeddings': {'w': np.ones(2)}})
  params, stats, t = checkpoint.read_init(bert)
  assert list(params) == ['text_encoder'] and stats is None and t is None
  assert checkpoint.load_text_init(bert)[0].to_dict() == mc.text.to_dict()

  with pytest.raises(errors.UsageError, match='does not exist'):
    checkpoint.read_init(str(tmp_path / 'nowhere'))
  with pytest.raises(errors.UsageError, match='neither a training workdir nor a converted checkpoint'):
    checkpoint.read_init(str(tmp_path))


def test_load_inference_against_a_target_lists_every_mismatch(tmp_path):
  mc = tiny.get_config().model
  out = checkpoint.save_inference(str(tmp_path / 'c'), mc, {'params': {'a': np.ones(2), 'b': np.ones(3)}})
  _, variables = checkpoint.load_inference(out)
  assert set(variables['params']) == {'a', 'b'}
  target = {'params': {'a': jax.ShapeDtypeStruct((2,), jnp.float32), 'c': jax.ShapeDtypeStruct((1,), jnp.float32)}}
  with pytest.raises(errors.UsageError, match=r'missing \(1\): params/c; unexpected \(1\): params/b$'):
    checkpoint.load_inference(out, target=target)


def test_training_checkpoint_meta_carries_the_config_digest(tmp_path, caplog):
  config = tiny.get_config()
  digest = checkpoint.config_digest(config)
  assert len(digest) == 64 and digest == checkpoint.config_digest(tiny.get_config())
  state = {'w': jnp.arange(4.0)}
  ck = checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1, async_save=False, config_digest=digest)
  ck.save(1, state, {'index': 1}, {'time': 0.0}, force=True)
  ck.close()
  abstract = jax.eval_shape(lambda: state)
  ck = checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1, config_digest=digest)
  with caplog.at_level(logging.WARNING):
    _, data_state, meta = ck.restore(abstract)
  assert meta['config_digest'] == digest and meta['step'] == 1 and data_state == {'index': 1}
  assert not [r for r in caplog.records if 'another config' in r.getMessage()]
  ck.close()

  config.unlock()
  config.train.total_steps = 7
  other = checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1,
                                       config_digest=checkpoint.config_digest(config))
  with caplog.at_level(logging.WARNING):
    other.restore(abstract)
  other.close()
  assert [r for r in caplog.records if 'another config than the one that saved it' in r.getMessage()]


def test_meta_carries_the_config_and_the_resume_keys_are_classified(tmp_path):
  config = tiny.get_config()
  state = {'w': jnp.arange(4.0)}
  ck = checkpoint.TrainCheckpointer(str(tmp_path / 'checkpoints'), save_every=1, keep=1, async_save=False,
                                    config=config)
  assert checkpoint.check_resume(config, str(tmp_path), ck) is None   # no checkpoint: a fresh run
  ck.save(1, state, {'index': 1}, force=True)
  meta = ck.read_meta(1)
  assert meta['config'] == json.loads(checkpoint.config_json(config))
  assert meta['config_digest'] == checkpoint.config_digest(config)
  assert checkpoint.check_resume(config, str(tmp_path), ck) == []
  longer = tiny.get_config()
  longer.unlock()
  longer.train.total_steps, longer.mesh, longer.eval.short_side = 3000, (('data', -1), ('fsdp', 2)), 224
  assert checkpoint.check_resume(longer, str(tmp_path), ck) == [
      'eval.short_side: 80 -> 224', 'mesh: [["data", -1], ["fsdp", 1]] -> [["data", -1], ["fsdp", 2]]',
      'train.total_steps: 1500 -> 3000']
  other = tiny.get_config()
  other.unlock()
  other.seed, other.optim.base_lr = 3, 1.0
  with pytest.raises(errors.UsageError, match=r'may not change optim.base_lr: .* -> 1.0, seed: 0 -> 3 '):
    checkpoint.check_resume(other, str(tmp_path), ck)
  ck.close()
  assert checkpoint.may_change_on_resume('data.data_dir') and checkpoint.may_change_on_resume('sharding.rules')
  assert not checkpoint.may_change_on_resume('model.vision.width')
  assert not checkpoint.may_change_on_resume('train.global_batch_size')


def test_restore_newest_skips_an_unreadable_step_and_set_aside_keeps_it(tmp_path):
  state = {'w': jnp.arange(4000.0), 'b': jnp.ones(3)}
  abstract = jax.eval_shape(lambda: state)
  ck = checkpoint.TrainCheckpointer(str(tmp_path / 'checkpoints'), save_every=1, keep=5, async_save=False)
  for step in (1, 2, 3):
    ck.save(step, jax.tree.map(lambda x, s=step: x * s, state), {'index': step}, force=True)
  files = [p for p in (tmp_path / 'checkpoints' / '3').rglob('*') if p.is_file()]
  big = max(files, key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
  with pytest.raises(checkpoint.CheckpointUnreadable, match=r'^checkpoint step 3 in .* is unreadable \('):
    ck.restore(abstract, 3)
  step, (restored, data_state, _), bad = ck.restore_newest(lambda s: ck.restore(abstract, s))
  assert (step, data_state, bad) == (2, {'index': 2}, [3])
  np.testing.assert_array_equal(restored['w'], np.arange(4000.0) * 2)
  where = ck.set_aside(bad)
  assert ck.all_steps() == [1, 2] and (tmp_path / checkpoint.UNREADABLE / '3').is_dir()
  assert where == str(tmp_path / checkpoint.UNREADABLE)
  ck.save(3, state, {'index': 3}, force=True)   # the step number is free again
  assert ck.all_steps() == [1, 2, 3]
  ck.close()
  with pytest.raises(errors.UsageError, match=r'does not fit the model .*another shape \(1\): w \(4000,\)'):
    ck2 = checkpoint.TrainCheckpointer(str(tmp_path / 'checkpoints'), save_every=1, keep=5)
    try:
      ck2.restore({'w': jax.ShapeDtypeStruct((5,), jnp.float32), 'b': abstract['b']})
    finally:
      ck2.close()


def test_write_config_is_the_digested_text(tmp_path):
  config = tiny.get_config()
  checkpoint.write_config(config, str(tmp_path))
  text = (tmp_path / checkpoint.CONFIG).read_text()
  assert text == checkpoint.config_json(config)
  assert json.loads(text)['model']['vision']['width'] == config.model.vision.width


def test_init_from_an_inference_checkpoint_places_params_stats_and_teacher(tmp_path):
  """train.apply_init on a sharded fresh state: every array of the source lands (sharded like the state);
  a source that does not fit is refused with every misfit named."""
  from ovseg_jax import optim  # pylint: disable=g-import-not-at-top
  from ovseg_jax import sharding  # pylint: disable=g-import-not-at-top
  from ovseg_jax import train  # pylint: disable=g-import-not-at-top
  from ovseg_jax import train_step  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures  # pylint: disable=g-import-not-at-top
  config = train_fixtures.small_config(stage=2, mesh=(('data', 2), ('fsdp', 4)))
  model = train_step.make_model(config)
  tx, _ = optim.make_optimizer(config.optim, total_steps=6, warmup_steps=1, global_batch=8)
  mesh = sharding.make_mesh(config.mesh)

  def init_fn(r):
    return train_step.init_state(config, model, tx, r)

  def fresh(seed):   # one compile: the same init_fn every time
    return sharding.create_sharded_state(init_fn, mesh, config.sharding, jax.random.key(seed))[0]
  source = jax.tree.map(np.asarray, fresh(1))
  teacher = jax.tree.map(lambda x: x + 1.0, source['params']['img_encoder'])
  stats = jax.tree.map(lambda x: x + 0.5, source['batch_stats'])
  src = checkpoint.save_inference(str(tmp_path / 'src'), config.model,
                                  {'params': source['params'], 'batch_stats': stats}, teacher=teacher)
  config.unlock()
  config.train.init_from = src
  config.train.init_teacher_from_student = False
  state = fresh(0)
  out = train.apply_init(dict(state), config)
  for name, x in param_tree.named_leaves(out['params']):
    np.testing.assert_array_equal(x, dict(param_tree.named_leaves(source['params']))[name], err_msg=name)
  for got, want in zip(jax.tree.leaves(out['ema']), jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(out['batch_stats']), jax.tree.leaves(stats)):
    np.testing.assert_array_equal(got, want)
  for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
    assert got.sharding == ref.sharding

  bad = dict(source['params'], extra={'w': np.zeros(2, np.float32)})
  bad['logit_scale'] = np.zeros(3, np.float32)
  checkpoint.save_inference(str(tmp_path / 'bad'), config.model, {'params': bad})
  config.train.init_from = str(tmp_path / 'bad')
  with pytest.raises(errors.UsageError, match=r'unexpected \(1\): extra/w; another shape \(1\): '
                                              r'logit_scale \(3,\) \(model \(\)\)$'):
    train.apply_init(dict(state), config)
