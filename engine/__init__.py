"""The runtime engine of ComfyUI-TLoRA on a ComfyUI model: files, plan, key maps, weights, bases, patcher,
timesteps, apply, save. It imports ComfyUI and `tlora_core`, never the node modules: dependencies run
nodes -> engine -> tlora_core.

  files       T-LoRA files in ComfyUI's folders: paths, identity on disk, an in-process cache, header-only info
  plan        which layer (or row slice of a fused layer) each module of a file patches
  keymaps/    diffusers <-> ComfyUI module names per model family (ComfyUI's own maps plus what they lack)
  weights     a layer's base weight as the layer computes with it, whatever the storage
  bases       the SVD base of every module (rebuilt, stored or none), memoised on the loaded model
  timesteps   sigma -> the trainer's timestep, per model sampling
  patcher     the per-call rank: injections into target layers and an APPLY_MODEL wrapper
  apply       all of the above for one file on one model (and its text encoder)
  save        self-contained copies of LyCORIS files
  scheduled   any standard LoRA on a timestep schedule: the same per-call slots with a strength per call
  conv        the conv arguments factors run with on a conv layer (one rule for the loader and the trainer)
  training/   Train T-LoRA: settings, the trainable slots on a clone, checkpointing, the loop, init and resume,
              the files a run writes and their training state (train_targets: which layers, under which names)
"""

from .apply import Settings, apply_text_encoder, apply_tlora, resolve_schedule
from .files import describe_lora, file_key, lora_path, output_path, read_file
from .save import output_name, save_with_base

__all__ = ["Settings", "apply_text_encoder", "apply_tlora", "describe_lora", "file_key", "lora_path", "output_name",
           "output_path", "read_file", "resolve_schedule", "save_with_base"]
