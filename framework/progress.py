"""How far training is: the one count of optimizer steps, advanced by the Trainer, read by plugins and models."""
from dataclasses import dataclass


@dataclass
class Progress:
    """The run's position, saved in every checkpoint (as "position"); plugins get it at setup and only read it."""

    step: int = 0  # optimizer steps done (1 after the first)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a checkpoint's position in place: whoever holds this object sees the restored step."""
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
