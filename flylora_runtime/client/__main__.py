"""``python -m flylora_runtime.client``: the ``flylora`` command (:mod:`flylora_runtime.client.cli`)."""

from flylora_runtime.client.cli import main

raise SystemExit(main())
