"""Trainers, one per kind of training, selected by `config.trainer`.

Each is `train_and_evaluate(config, workdir) -> results` and imported explicitly here.
"""

from bigssl_med.trainers import finetune
from bigssl_med.trainers import pretrain
from bigssl_med.trainers import segment
from bigssl_med.trainers import stages

TRAINERS = {
    'pretrain': pretrain.train_and_evaluate,
    'finetune': finetune.train_and_evaluate,
    'linear_eval': finetune.train_and_evaluate,
    'distill': finetune.train_and_evaluate,
    'segment': segment.train_and_evaluate,
    'stages': stages.train_and_evaluate,
}
