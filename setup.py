"""bigssl_med: big self-supervised models (SimCLR, MICLe) for medical imaging in JAX."""

import setuptools


setuptools.setup(
    name='bigssl_med',
    version='0.1.0',
    description='SimCLR / MICLe pretraining and transfer for medical imaging in JAX/Flax.',
    packages=setuptools.find_packages(include=['bigssl_med', 'bigssl_med.*',
                                               'tfds_builders', 'tfds_builders.*']),
    package_data={'tfds_builders': ['*/*.tsv', '*/*.txt']},
    python_requires='>=3.11',  # jax>=0.10 has no wheels for 3.10
    install_requires=[
        'jax>=0.10.0',
        'flax>=0.12.0',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11.0',
        'grain>=0.2.16',                # close() on iterators, the worker state saved_workers reads
        'tensorflow-datasets>=4.9.9',
        'importlib_resources>=6.0',  # needed by tensorflow-datasets 4.9.x without TensorFlow
        'array-record>=0.7.0',
        'ml_collections>=1.0.0',
        'clu>=0.0.12',
        'numpy>=1.26',
        'pillow>=10.0',
        'scikit-learn>=1.4',
        'scipy>=1.11',
        'matplotlib>=3.8',
        'absl-py>=2.0',
        'safetensors>=0.4',             # published weights in .safetensors (bigssl_med.convert)
        'pydicom>=2.4',                 # DICOM images (tfds_builders.dicom: siim_acr_pneumothorax)
        # TensorBoard events through clu's writer; imported lazily (see ARCHITECTURE.md).
        'tensorboard>=2.16',
        'tensorflow-cpu>=2.16; platform_system == "Linux" and platform_machine == "x86_64"',
        'tensorflow>=2.16; platform_system != "Linux" or platform_machine != "x86_64"',
    ],
    extras_require={
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5'],
        'gpu': ['jax[cuda12]>=0.10.0'],
        # bigssl_med.convert reads torch.save zip files itself; PyTorch only for older files.
        'convert': ['torch>=1.6'],
    },
)
