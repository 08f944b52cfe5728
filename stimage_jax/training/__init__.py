"""Training machinery shared by the ensemble and the cell network: the train-state pytree,
the module-level jitted steps and the checkpoint wrapper (one metadata format)."""

from stimage_jax.training.checkpoint import CHECKPOINT_FORMAT, CheckpointMeta, Checkpointer
from stimage_jax.training.loop import eval_step, keep_best, members_eval_step, members_train_step, train_step
from stimage_jax.training.state import TrainState, concat_members, select_members, split_members

__all__ = ["TrainState", "train_step", "eval_step", "members_train_step", "members_eval_step", "keep_best",
           "select_members", "concat_members", "split_members", "Checkpointer", "CheckpointMeta",
           "CHECKPOINT_FORMAT"]
