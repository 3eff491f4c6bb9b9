"""Moved: ``python -m flylora_runtime.generate`` is now ``flylora-random-adapters`` (:mod:`flylora_runtime.training.random_adapters`)."""

if __name__ == "__main__":
    from flylora_runtime._moved import forward

    forward("flylora_runtime.generate", "flylora_runtime.training.random_adapters", "flylora-random-adapters")
