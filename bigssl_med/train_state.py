"""A trainer's starting state: variables and optimiser, replicated, restored or new.

Every trainer starts the same way: shapes from `jax.eval_shape`, the optimiser built
for those parameters, replicated shardings, and the one priority order of
`bigssl_med.checkpointing.restore_or_initialize` (resume > init_from > scratch).
"""

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bigssl_med import checkpointing, config_schema
from bigssl_med import parallel
from bigssl_med import workdir as workdir_lib
from bigssl_med.data import sources
from bigssl_med.errors import ConfigError, UserError

COMPUTE_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


def compute_dtype(config: ml_collections.ConfigDict):
  """The activations' dtype that `config.compute_dtype` names."""
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f'config.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, '
                      f'got {config.compute_dtype!r}')
  return COMPUTE_DTYPES[config.compute_dtype]


@dataclasses.dataclass
class Start:
  """What `start` returns.

  Attributes:
    variables, opt: the model variables and `{'step', 'opt_state'}`, replicated.
    data_state: the input iterator's saved state (None unless resumed).
    origin: which starting point applied, in words.
    initialised_from: `{'init_from', 'checkpoint', 'step'}` of the run's first start,
      the same after any resume (`checkpointing.recorded_init`); None from scratch.
    checkpointer: the run's checkpointer (the trainer closes it).
    tx: the optimiser.
    shardings: `{'model': ..., 'opt': ...}`, trees of the replicated sharding.
    abstract_model: shapes, dtypes and shardings of the model variables.
  """
  variables: Any
  opt: Any
  data_state: bytes | None
  origin: str
  initialised_from: dict[str, Any] | None
  checkpointer: checkpointing.Checkpointer
  tx: optax.GradientTransformation
  shardings: dict[str, Any]
  abstract_model: Any


# Settings a resumed run may change: its length (a run continued for longer).
RESUMABLE_KEYS = ('total_steps', 'num_epochs')


def _check_resumed_settings(workdir: str, config) -> None:
  """Fails when a resumed run asks for other settings than its checkpoint was trained with.

  Bookkeeping (paths, workers, logging) and the run's length may change; anything
  else (MICLe, temperature, label fraction, learning rate, ...) would make one run
  of two settings, recorded under the last one.
  """
  saved = workdir_lib.read_config(workdir)  # a damaged one is an error, not "no record"
  if saved is None:
    return
  differences = [d for d in config_schema.setting_differences(saved, config.to_dict())
                 if d[0] not in RESUMABLE_KEYS]
  if differences:
    raise ConfigError(f'{workdir} holds a run with other settings, stopped before its end: '
                      f'{config_schema.describe_differences(differences)}; rerun it as it '
                      'was to resume, or use a new workdir')


def check_not_past(workdir: str, step: int, total_steps: int) -> None:
  """Fails when the checkpoint a run resumes from is past the run's length: a run may be
  continued for longer, not shortened (its results would mix the two lengths)."""
  if step > total_steps:
    raise ConfigError(f'{workdir} holds a run trained to step {step}, past this config\'s '
                      f'{total_steps} steps (config.total_steps / num_epochs): a run can be '
                      'continued for longer, not shortened; use a new workdir')


DATA_FILE = 'data.json'


def data_fingerprint(config: ml_collections.ConfigDict, data_dir: str) -> dict[str, Any]:
  """`sources.fingerprint` of the splits a run trains and selects its model on
  (`config.data.train_split` and `eval_split`), for `start`'s `data`."""
  return sources.fingerprint(config.dataset, data_dir,
                             (config.data.train_split, config.data.eval_split))


def _check_resumed_data(workdir: str, data: dict[str, Any]) -> None:
  """Fails when a resumed run reads another build of its data set than it was trained on.

  The checkpoint's input position points into the records as built then; a run
  whose workdir has no `data.json` (written by an earlier version, or deleted to
  accept the data as it is now) is not checked; a damaged one is an error.
  """
  path = os.path.join(workdir, DATA_FILE)
  recorded = workdir_lib.read_record(
      path, 'restore it, or delete it to go on with the data as it is now',
      keys=('dataset', 'splits'))
  differs = sources.fingerprint_differences(recorded, data)
  if differs:
    raise ConfigError(f'{workdir} holds a run stopped before its end on another build of its '
                      f'data: {differs}; rebuild the data set as it was to resume, use a new '
                      f'workdir, or delete {path} to go on with the data as it is now')


def start(model: nn.Module, *, config: ml_collections.ConfigDict, workdir: str,
          mesh: jax.sharding.Mesh, make_tx: Callable[[Any], optax.GradientTransformation],
          init_keys: tuple[str, ...], partial_keys: tuple[str, ...] = (),
          data: dict[str, Any] | None = None, total_steps: int | None = None) -> Start:
  """Builds or restores the state of a run of `model` in `workdir`.

  Args:
    model: a Flax module called as `model(images, train=False)`.
    config: the run's config (seed, init_from, data.image_size, checkpoint keys).
    workdir: the run's workdir (checkpoints in `workdir/checkpoints`).
    mesh: the device mesh; everything is replicated over it.
    make_tx: the optimiser for the (abstract) parameters.
    init_keys, partial_keys: what `init_from` loads (see `restore_or_initialize`).
    data: the `sources.fingerprint` of the splits the run trains and selects on,
      written to `workdir/data.json`; a resumed run must read the build it was
      trained on. None: neither checked nor written (a finished run, returning its
      results).
    total_steps: the run's length; a checkpoint past it is refused (`check_not_past`)
      before anything is written.
  """
  size = config.data.image_size

  def init_variables(rng):
    return dict(model.init(rng, jnp.zeros((2, size, size, 3), jnp.float32), train=False))

  abstract_variables = jax.eval_shape(init_variables, jax.random.key(config.seed))
  tx = make_tx(abstract_variables['params'])

  def init_opt(variables):
    return {'step': jnp.zeros((), jnp.int32), 'opt_state': tx.init(variables['params'])}

  repl = parallel.replicated(mesh)
  abstract_opt = jax.eval_shape(init_opt, abstract_variables)
  shardings = {'model': jax.tree.map(lambda _: repl, abstract_variables),
               'opt': jax.tree.map(lambda _: repl, abstract_opt)}
  init_variables_jit = jax.jit(init_variables, out_shardings=shardings['model'])
  init_opt_jit = jax.jit(init_opt, out_shardings=shardings['opt'])

  def fresh():
    variables = init_variables_jit(jax.random.key(config.seed))
    return variables, init_opt_jit(variables)

  def with_sharding(tree, sharding_tree):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding_tree)

  checkpointer = checkpointing.Checkpointer(workdir, keep_last=config.keep_checkpoints,
                                            keep_every=config.keep_checkpoint_every_steps)
  abstract_model = with_sharding(abstract_variables, shardings['model'])
  variables, opt, data_state, origin, initialised_from = checkpointing.restore_or_initialize(
      checkpointer, init_fn=fresh, abstract_model=abstract_model,
      abstract_opt=with_sharding(abstract_opt, shardings['opt']), init_from=config.init_from,
      init_keys=init_keys, model_sharding=repl, finalize_opt=init_opt_jit,
      partial_keys=partial_keys, model_config=config.model)
  if origin.startswith('resumed'):
    try:
      _check_resumed_settings(workdir, config)
      if total_steps is not None:
        check_not_past(workdir, int(opt['step']), total_steps)
      if data is not None:
        _check_resumed_data(workdir, data)
    except UserError:
      checkpointer.close()  # nothing more is read or written here
      raise
  workdir_lib.write_config(workdir, config)  # this run goes on here: its config is the one
  if data is not None:
    workdir_lib.write_json(os.path.join(workdir, DATA_FILE), data)
  return Start(variables=variables, opt=opt, data_state=data_state, origin=origin,
               initialised_from=initialised_from, checkpointer=checkpointer, tx=tx,
               shardings=shardings, abstract_model=abstract_model)
