r"""Times the pretrain step on the devices present, with synthetic data.

The step is the trainer's own (`bigssl_med.contrastive.make_train_step`): on-device
SimCLR augmentation of both views, the ResNet + projection head forward and backward
pass over the 2B views, nt_xent over the global batch, and the LARS update, jitted
over a `data` mesh of every device, state donated. The trainer's linear probe
(`config.probe`: one BatchNorm and a 2048 x classes layer on stopped features, well
under 0.1% of the FLOPs) is left out, so synthetic batches need no labels.

Reports views/s (2 x batch x steps/s), the model FLOP utilisation (training FLOPs of
the encoder + head, taken as 3x the forward pass counted layer by layer,
over the devices' peak dense bf16 rate), and the FLOPs XLA's cost analysis finds in
the compiled step (which leaves out convolutions run by cuDNN).

  python benchmarks/pretrain_step.py                       # ResNet-50, 224, 2 x 256, bf16
  python benchmarks/pretrain_step.py --depth 18 --width 0.25 --image_size 64 --batch 32
  python benchmarks/pretrain_step.py --no_augment          # the model step alone
  python benchmarks/pretrain_step.py --fused_bn            # config.model.fused_bn = True
  python benchmarks/pretrain_step.py --lars_batched_norms  # config.optimizer.lars_batched_norms

Each run appends one JSON line to --out (default: print only).
"""

import argparse
import json
import os
import platform
import re
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bigssl_med import augment, contrastive, models, optim, parallel  # noqa: E402  pylint: disable=g-import-not-at-top

# Peak dense bf16 TFLOP/s per device, by a substring of `device_kind`.
_PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'v5p': 459.0,
                'v5 lite': 197.0, 'v5e': 197.0, 'v4': 275.0, 'v6': 918.0}


def _peak_tflops(device) -> float | None:
  kind = getattr(device, 'device_kind', '')
  for key, value in _PEAK_TFLOPS.items():
    if key.lower() in kind.lower():
      return value
  return None


def forward_flops(model, variables, input_shape) -> float:
  """FLOPs (2 x multiply-adds) of the model's convolutions and dense layers, counted per layer.

  XLA's cost analysis does not count convolutions that run as cuDNN calls, so the
  model FLOPs are counted from the layers' shapes instead.
  """
  total = [0.0]

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      kernel = module.variables['params']['kernel']
      fan_in = np.prod(kernel.shape[:-1])
      total[0] += 2.0 * np.prod(out.shape[:-1]) * fan_in * kernel.shape[-1]
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros(input_shape), train=False), variables)
  return total[0]


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0)) if analysis else 0.0


# What the compiled step runs, by a marker in its HLO text: library calls and fusions.
_KERNEL_MARKERS = {
    'cudnn_convolutions': re.compile(r'custom_call_target="__cudnn\$conv'),
    'cudnn_fusions': re.compile(r'"kind":\s*"__cudnn\$fusion"'),
    'cublas_gemms': re.compile(r'custom_call_target="__cublas\$'),
    'triton_gemm_fusions': re.compile(r'"kind":\s*"__triton_gemm"'),
    'fusions': re.compile(r'\sfusion\('),
}


def kernel_census(hlo_text: str) -> dict[str, int]:
  """How many of each kind of kernel the compiled step's HLO text launches.

  `cudnn_fusions` counts the convolutions XLA hands to cuDNN together with their
  element-wise neighbours and a reduction (`--xla_gpu_experimental_enable_conv_fusion`);
  `fusions` counts every fusion instruction, XLA's own kernels included.
  """
  return {name: len(marker.findall(hlo_text)) for name, marker in _KERNEL_MARKERS.items()}


def make_step(*, depth=50, width=1.0, sk_ratio=0.0, image_size=224, batch=256,
              dtype='bfloat16', augment_on_device=True, fused_bn=False,
              lars_batched_norms=False) -> types.SimpleNamespace:
  """The trainer's jitted pretrain step over every device, with fresh state.

  Returns a namespace with `mesh`, `num_devices`, `model`, `variables`, `state`
  (`{'model', 'opt'}`), `train_step` (jitted, state donated), `batch_sharding`,
  `image_size` and `batch`.
  """
  mesh = parallel.data_mesh()
  n_dev = mesh.devices.size
  if batch % n_dev:
    raise SystemExit(f'--batch {batch} is not a multiple of the {n_dev} devices')
  jdtype = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  model = models.ContrastiveModel(
      encoder=models.ResNet(depth=depth, width_multiplier=width, sk_ratio=sk_ratio,
                            dtype=jdtype, fused_bn=fused_bn),
      head=models.ProjectionHead(num_layers=3, out_dim=128, dtype=jdtype))
  schedule = optim.warmup_cosine(optim.peak_learning_rate(0.3, 'linear', batch), 10_000, 100)

  def init(rng):
    return dict(model.init(rng, jnp.zeros((2, image_size, image_size, 3)), train=False))

  abstract = jax.eval_shape(init, jax.random.key(0))
  opt_config = types.SimpleNamespace(name='lars', weight_decay=1e-6, trust_coefficient=1e-3,
                                     momentum=0.9, lars_batched_norms=lars_batched_norms)
  tx = optim.build_optimizer(opt_config, schedule, abstract['params'])
  repl = parallel.replicated(mesh)
  variables = jax.jit(init, out_shardings=repl)(jax.random.key(0))
  opt = jax.jit(lambda v: {'step': jnp.zeros((), jnp.int32), 'opt_state': tx.init(v['params'])},
                out_shardings=repl)(variables)
  if augment_on_device:
    augment_views = augment.simclr_augment
  else:
    def augment_views(key, views):
      return augment.to_float(views)
  step_fn = contrastive.make_train_step(model, tx, schedule, augment_views=augment_views,
                                        temperature=0.1, weight_decay=1e-6)
  batch_sharding = parallel.batch_sharding(mesh)
  train_step = jax.jit(step_fn, in_shardings=(repl, batch_sharding, repl),
                       out_shardings=(repl, repl), donate_argnums=0)
  return types.SimpleNamespace(
      mesh=mesh, num_devices=n_dev, model=model, variables=variables,
      state={'model': variables, 'opt': opt}, train_step=train_step,
      batch_sharding=batch_sharding, image_size=image_size, batch=batch)


def synthetic_batches(setup, count: int) -> list:
  """`count` random uint8 view batches, already on the devices."""
  rng = np.random.default_rng(0)
  size = setup.image_size
  return [jax.device_put(
      {'views': rng.integers(0, 256, (setup.batch, 2, size, size, 3), dtype=np.uint8)},
      setup.batch_sharding) for _ in range(count)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--depth', type=int, default=50)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--sk_ratio', type=float, default=0.0)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=256, help='global batch of pairs (2x views)')
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--no_augment', action='store_true', help='skip the device augmentation')
  p.add_argument('--fused_bn', action='store_true',
                 help='BatchNorm with the hand-written gradient (config.model.fused_bn)')
  p.add_argument('--lars_batched_norms', action='store_true',
                 help='LARS norms in one reduction (config.optimizer.lars_batched_norms)')
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='peak per device for MFU (default: from the device kind)')
  p.add_argument('--out', default='', help='append a JSON line with the results here')
  p.add_argument('--profile', default='', help='write a profiler trace of 3 steps to this dir')
  p.add_argument('--dump_hlo', default='', help='write the compiled step\'s HLO to this file')
  args = p.parse_args(argv)

  setup = make_step(depth=args.depth, width=args.width, sk_ratio=args.sk_ratio,
                    image_size=args.image_size, batch=args.batch, dtype=args.dtype,
                    augment_on_device=not args.no_augment, fused_bn=args.fused_bn,
                    lars_batched_norms=args.lars_batched_norms)
  model, variables, state, train_step = (setup.model, setup.variables, setup.state,
                                         setup.train_step)
  n_dev, size = setup.num_devices, args.image_size
  batches = synthetic_batches(setup, 2)
  key = jax.random.key(1)

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batches[0], key).compile()
  compile_seconds = time.perf_counter() - t0
  step_flops = _flops(compiled)
  model_flops = 3.0 * forward_flops(model, variables, (2 * args.batch, size, size, 3))
  hlo_text = compiled.as_text()
  if args.dump_hlo:
    with open(args.dump_hlo, 'w') as f:
      f.write(hlo_text)

  for i in range(args.warmup):
    state, metrics = compiled(state, batches[i % 2], key)
  jax.block_until_ready((state, metrics))
  times = []
  t_all = time.perf_counter()
  for i in range(args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2], key)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - t)
  jax.block_until_ready(state)
  wall = time.perf_counter() - t_all
  step_time = float(np.median(times))

  if args.profile:
    with jax.profiler.trace(args.profile):
      for i in range(3):
        state, metrics = compiled(state, batches[i % 2], key)
      jax.block_until_ready(state)

  device = jax.devices()[0]
  peak = args.peak_tflops or _peak_tflops(device)
  views_per_sec = 2 * args.batch / step_time
  mem = device.memory_stats() if hasattr(device, 'memory_stats') else None
  result = {
      'device': f'{n_dev} x {getattr(device, "device_kind", device.platform)}',
      'jax': jax.__version__, 'host': platform.node(),
      'model': (f'ResNet-{args.depth} x{args.width:g}'
                + (f' SK {args.sk_ratio:g}' if args.sk_ratio else '')),
      'image_size': size, 'pairs_per_step': args.batch, 'dtype': args.dtype,
      'augment': not args.no_augment, 'fused_bn': args.fused_bn,
      'lars_batched_norms': args.lars_batched_norms,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'step_ms_median': 1e3 * step_time, 'step_ms_mean': 1e3 * wall / args.steps,
      'views_per_sec': views_per_sec, 'views_per_sec_per_device': views_per_sec / n_dev,
      'model_tflop_per_step': model_flops / 1e12, 'xla_tflop_per_step': step_flops / 1e12,
      'mfu': (model_flops / step_time / (peak * 1e12 * n_dev)) if peak else None,
      'peak_tflops_per_device': peak, 'compile_s': compile_seconds,
      'peak_memory_gib': (mem or {}).get('peak_bytes_in_use', 0) / 2**30 if mem else None,
      'loss': float(metrics['loss']), 'kernels': kernel_census(hlo_text),
  }
  print(json.dumps(result))
  mfu = 'n/a' if result['mfu'] is None else f"{100 * result['mfu']:.1f}%"
  print(f"{result['model']} {size}px, {args.batch} pairs, {args.dtype}, "
        f"{'with' if not args.no_augment else 'without'} augmentation"
        f"{', fused BN' if args.fused_bn else ''}"
        f"{', batched LARS norms' if args.lars_batched_norms else ''} on {result['device']}: "
        f"{views_per_sec:,.0f} views/s, {1e3 * step_time:.1f} ms/step, MFU {mfu}")
  if args.out:
    with open(args.out, 'a') as f:
      f.write(json.dumps(result) + '\n')
  return result


if __name__ == '__main__':
  main()
