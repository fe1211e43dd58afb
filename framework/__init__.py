"""The training framework (engine, config, checkpoints, data) the recipes plug into."""
import glob as _glob
import os as _os

# DeepSpeed warns "Setting accelerator to CPU. If you have GPU ..., we were unable to detect it" on every command of
# a machine without a GPU. Where no NVIDIA driver or device exists at all there is no GPU to miss, so the CPU is named
# up front; with either (a GPU torch cannot use: a real problem) DeepSpeed still detects, and warns, as before.
if ("DS_ACCELERATOR" not in _os.environ and not _os.path.exists("/proc/driver/nvidia")
        and not _glob.glob("/dev/nvidia*")):
    _os.environ["DS_ACCELERATOR"] = "cpu"
