"""The pure-PyTorch FlyLoRA math (:mod:`.ops`) and the transformers end-to-end oracle (:mod:`.hf_oracle`):
what every kernel and engine path is tested against.
"""
