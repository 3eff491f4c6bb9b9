"""Moved: ``python -m flylora_runtime.train`` is now ``flylora-train`` (:mod:`flylora_runtime.training.trainer`)."""

if __name__ == "__main__":
    from flylora_runtime._moved import forward

    forward("flylora_runtime.train", "flylora_runtime.training.trainer", "flylora-train")
