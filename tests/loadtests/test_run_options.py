"""``python -m loadtests.run``'s options."""

from __future__ import annotations

import pytest


def test_adapter_kind_picks_the_defaults_adapters_and_is_refused_elsewhere(capsys):
    """``loadtests.run defaults --adapter-kind qv`` uploads q_proj/v_proj-only adapters (``full``, the default: all
    seven projections); any other scenario refuses the option with a usage error before starting anything."""
    from loadtests.defaults import ADAPTER_KINDS
    from loadtests.run import main
    from loadtests.stack import FLYLORA_FULL, FLYLORA_QV

    assert ADAPTER_KINDS == {"full": FLYLORA_FULL, "qv": FLYLORA_QV}
    assert FLYLORA_QV.targets == ("q_proj", "v_proj") and FLYLORA_FULL.r == FLYLORA_QV.r == 32
    with pytest.raises(SystemExit) as exc:
        main(["cold", "--adapter-kind", "qv"])
    assert exc.value.code == 2 and "--adapter-kind applies to the defaults scenario only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["defaults", "--adapter-kind", "lora"])
    assert "invalid choice" in capsys.readouterr().err
