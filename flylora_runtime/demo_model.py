"""Moved: ``python -m flylora_runtime.demo_model`` is now ``flylora-demo-model`` (:mod:`flylora_runtime.demo.model`)."""

if __name__ == "__main__":
    from flylora_runtime._moved import forward

    forward("flylora_runtime.demo_model", "flylora_runtime.demo.model", "flylora-demo-model")
