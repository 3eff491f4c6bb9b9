"""``python -m flylora_runtime.engine``: the same as ``flylora-engine``."""

from flylora_runtime.engine.launcher import main

if __name__ == "__main__":
    main()
