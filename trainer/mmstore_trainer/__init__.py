"""mmstore_trainer: trains vision-language models on samples whose images are mmstore refs.

Each sample's images are fetched by digest, verified, decoded by the one decoding rule and run
through the checkpoint's own HF image processor, then checked against the sample's descriptors
before a token of it is trained on (:mod:`.data`). A background loader keeps that ahead of the
step (:mod:`.loader`); samples are packed into micro-batches without cross-sample attention
(:mod:`.pack`); the step is a clipped, token-level policy-gradient update (:mod:`.loss`,
:mod:`.train`). Model-specific knowledge lives in :mod:`.families`. :class:`StepDataset` is that
data path as a ``torch.utils.data`` dataset for any training loop; under ``torchrun`` each rank
materializes only its share (:mod:`.sharding`) and trains with FSDP2 (:mod:`.distributed`).
The samples and their files are the contract's (:mod:`mmstore_client.samples`); the trainer
owns what turns them into tensors.
"""

from mmstore_trainer.checkpoint import save_checkpoint
from mmstore_trainer.config import MissingImagePolicy, Parallelism, TrainConfig
from mmstore_trainer.data import MaterializationError, MaterializedSample, Materializer
from mmstore_trainer.dataset import RankStep, StepDataset
from mmstore_trainer.loader import Loader
from mmstore_trainer.loss import PgStats, clipped_pg_loss, token_logprobs
from mmstore_trainer.metrics import StepMetrics, read_metrics
from mmstore_trainer.pack import MicroBatch, pack
from mmstore_trainer.sharding import assign
from mmstore_trainer.train import Trainer, TrainReport, train

__all__ = [
    "Loader",
    "MaterializationError",
    "MaterializedSample",
    "Materializer",
    "MicroBatch",
    "MissingImagePolicy",
    "Parallelism",
    "PgStats",
    "RankStep",
    "StepDataset",
    "StepMetrics",
    "TrainConfig",
    "TrainReport",
    "Trainer",
    "assign",
    "clipped_pg_loss",
    "pack",
    "read_metrics",
    "save_checkpoint",
    "token_logprobs",
    "train",
]
