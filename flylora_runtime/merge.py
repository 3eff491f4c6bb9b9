"""Moved: ``python -m flylora_runtime.merge`` is now ``flylora-merge`` (:mod:`flylora_runtime.training.merge`)."""

if __name__ == "__main__":
    from flylora_runtime._moved import forward

    forward("flylora_runtime.merge", "flylora_runtime.training.merge", "flylora-merge")
