"""arsq-lightning: auto-regressive soft Q-learning (ARSQ) over coarse-to-fine discretised actions, on Lightning.

The building blocks compose in user code; see the README's "Compose your own" section.
"""

from arsq_lightning.algos.arsq.critic import ARSQCritic, soft_advantages
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.algos.arsq.loss import ARSQLoss, conservative_penalty
from arsq_lightning.algos.base import Critic, Head, Loss, total_loss
from arsq_lightning.algos.cqn.critic import CQNCritic
from arsq_lightning.algos.cqn.head import CQNHead
from arsq_lightning.algos.cqn.loss import CQNLoss, c51_projection
from arsq_lightning.data.d4rl import DemoSplit, normalized_score, split_demos
from arsq_lightning.data.datasets import check_against_env, read_d4rl_hdf5, read_minari, write_d4rl_hdf5
from arsq_lightning.data.offline import OfflineToOnlineDataModule
from arsq_lightning.data.online import OnlineDataModule, UpdateTickets
from arsq_lightning.discretizers import CoarseToFineDiscretizer, Discretizer, QuantileDiscretizer
from arsq_lightning.envs.core import EnvSpec, env_spec_of, make_env, stack_frames
from arsq_lightning.errors import ConfigError
from arsq_lightning.module import ARSQModule
from arsq_lightning.nets.augment import RandomShift, random_shift
from arsq_lightning.nets.encoders import DrQEncoder, Encoder, FlattenEncoder, MLPEncoder, MultiViewCNNEncoder
from arsq_lightning.policy import ARSQActor, make_actor

__version__ = "0.1.0"
__all__ = [
    "ARSQActor", "ARSQCritic", "ARSQLoss", "ARSQModule", "AutoregressiveHead", "CQNCritic", "CQNHead", "CQNLoss",
    "CoarseToFineDiscretizer", "ConfigError", "Critic", "DemoSplit", "Discretizer", "DrQEncoder",
    "Encoder", "EnvSpec", "Head", "Loss",
    "FlattenEncoder", "MLPEncoder", "MultiViewCNNEncoder", "OfflineToOnlineDataModule", "OnlineDataModule",
    "QuantileDiscretizer", "RandomShift", "UpdateTickets", "c51_projection", "check_against_env",
    "conservative_penalty",
    "env_spec_of", "make_actor", "make_env", "normalized_score", "random_shift", "read_d4rl_hdf5", "read_minari",
    "soft_advantages", "stack_frames", "total_loss",
    "split_demos", "write_d4rl_hdf5",
]
