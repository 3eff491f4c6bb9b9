"""Moved: ``python -m flylora_runtime.tasks.evaluate`` is now ``flylora-evaluate`` (:mod:`flylora_runtime.demo.evaluate`)."""

if __name__ == "__main__":
    from flylora_runtime._moved import forward

    forward("flylora_runtime.tasks.evaluate", "flylora_runtime.demo.evaluate", "flylora-evaluate")
