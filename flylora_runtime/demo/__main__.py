"""``python -m flylora_runtime.demo``: the demo CLI (:mod:`flylora_runtime.demo.cli`)."""

from flylora_runtime.demo.cli import main

if __name__ == "__main__":
    main()
