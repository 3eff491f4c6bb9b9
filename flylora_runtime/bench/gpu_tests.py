"""Run the Triton kernel tests (``tests/kernels/test_triton.py``) for ``make gpu-check``, on a machine that may
have PyTorch and Triton and nothing else.

With pytest installed they run under pytest (a child process, results read from its JUnit XML). Without
it, a minimal runner imports the test module with a stand-in ``pytest`` module that knows what the kernel
tests use (``mark.parametrize``, ``mark.skipif``, ``skip``, ``raises``, ``fail``) and runs every
parametrized case in this process. Without ``safetensors`` (the kernels import it for adapter files, which
the kernel tests never read) a stand-in that raises on use is put on the path. Either way the result is
``{"runner", "passed", "failed", "skipped", "total", "failures": [{"test", "message"}], "duration_s"}``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_FILE = "tests/kernels/test_triton.py"

_SAFETENSORS_STUB = '''"""Stand-in written by flylora_runtime.bench.gpu_tests: safetensors is not installed here."""
def _missing(*args, **kwargs):
    raise ImportError("safetensors is not installed: adapter files cannot be read on this machine")
safe_open = load_file = save_file = load = save = _missing
'''


def ensure_safetensors(stub_dir: Path) -> str | None:
    """Make ``import safetensors`` work; returns the folder to put on ``PYTHONPATH`` when a stand-in was
    needed (None when the real package is installed)."""
    if importlib.util.find_spec("safetensors") is not None:
        return None
    pkg = stub_dir / "safetensors"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(_SAFETENSORS_STUB)
    (pkg / "torch.py").write_text(_SAFETENSORS_STUB)
    if str(stub_dir) not in sys.path:
        sys.path.insert(0, str(stub_dir))
    return str(stub_dir)


def run_with_pytest(test_file: str, timeout_s: float, extra_path: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), extra_path, env.get("PYTHONPATH")) if p)
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
                                   f"--junitxml={xml}"], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            return {"runner": "pytest", "passed": 0, "failed": 1, "skipped": 0, "total": 1, "duration_s": timeout_s,
                    "failures": [{"test": test_file, "message": f"timed out after {timeout_s:.0f} s"}],
                    "output_tail": str(exc.stdout or "")[-3000:]}
        duration = time.monotonic() - t0
        if not xml.is_file():
            return {"runner": "pytest", "passed": 0, "failed": 1, "skipped": 0, "total": 1, "duration_s": duration,
                    "failures": [{"test": test_file, "message": f"pytest exited {proc.returncode} without results"}],
                    "output_tail": tail}
        return {**parse_junit(xml.read_text()), "runner": "pytest", "duration_s": duration, "output_tail": tail}


def parse_junit(text: str) -> dict:
    """Counts and failures from a JUnit XML report (pytest's ``--junitxml``)."""
    root = ET.fromstring(text)
    passed = failed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed += 1
            failures.append({"test": name, "message": (bad.get("message") or bad.text or "")[:2000]})
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped, "total": passed + failed + skipped,
            "failures": failures}


# --- the minimal runner -----------------------------------------------------------------------------------

class Skipped(Exception):
    pass


class Failed(AssertionError):
    pass


class _Mark:
    """``pytest.mark``: ``parametrize`` and ``skipif`` recorded on the function; any other marker is a no-op."""

    def parametrize(self, names, values, ids=None):
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        values, ids = list(values), list(ids) if ids is not None else None

        def deco(fn):
            fn.__dict__.setdefault("_params", []).insert(0, (names, values, ids))
            return fn
        return deco

    def skipif(self, condition, reason=""):
        def deco(fn):
            if condition:
                fn._skip_reason = reason or "skipif"
            return fn
        return deco

    def __getattr__(self, name):
        return _NoopMarker()


class _NoopMarker:
    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return self


def _skip(msg: str = "", allow_module_level: bool = False):
    raise Skipped(msg)


def _fail(msg: str = "", pytrace: bool = True):
    raise Failed(msg)


@contextlib.contextmanager
def _raises(expected, match: str | None = None):
    try:
        yield
    except expected as exc:
        if match is not None and not re.search(match, str(exc)):
            raise Failed(f"{type(exc).__name__}({exc!s}) does not match {match!r}") from exc
        return
    raise Failed(f"DID NOT RAISE {expected}")


def pytest_standin() -> types.ModuleType:
    mod = types.ModuleType("pytest")
    mod.mark, mod.skip, mod.fail, mod.raises = _Mark(), _skip, _fail, _raises
    mod.fixture = lambda *a, **k: (a[0] if len(a) == 1 and callable(a[0]) and not k else (lambda fn: fn))
    mod.__flylora_standin__ = True
    return mod


def _cases(fn):
    """``(id, kwargs)`` for every combination of ``fn``'s parametrize decorators (the first one outermost)."""
    params = getattr(fn, "_params", [])
    axes = []
    for names, values, ids in params:
        axis = []
        for j, v in enumerate(values):
            kw = dict(zip(names, v if len(names) > 1 else (v,)))
            axis.append((str(ids[j]) if ids else "-".join(str(x) for x in kw.values()), kw))
        axes.append(axis)
    for combo in itertools.product(*axes) if axes else [()]:
        kwargs = {}
        for _, kw in combo:
            kwargs.update(kw)
        yield "-".join(i for i, _ in reversed(combo)), kwargs


def run_builtin(test_file: str) -> dict:
    """Import ``test_file`` with the stand-in pytest and run its tests here."""
    t0 = time.monotonic()
    saved = sys.modules.get("pytest")
    sys.modules["pytest"] = pytest_standin()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    passed = failed = skipped = 0
    failures = []
    path = Path(test_file) if Path(test_file).is_absolute() else REPO / test_file
    name = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".") if path.is_relative_to(REPO) \
        else "gpu_check_" + path.stem
    try:
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Skipped as exc:
            return {"runner": "builtin", "passed": 0, "failed": 0, "skipped": 1, "total": 1, "failures": [],
                    "skipped_reason": str(exc), "duration_s": time.monotonic() - t0}
        for attr, fn in list(vars(module).items()):
            if not (attr.startswith("test_") and callable(fn) and getattr(fn, "__module__", None) == module.__name__):
                continue
            for case_id, kwargs in _cases(fn):
                test = f"{test_file}::{attr}" + (f"[{case_id}]" if case_id else "")
                if getattr(fn, "_skip_reason", None):
                    skipped += 1
                    continue
                try:
                    fn(**kwargs)
                    passed += 1
                except Skipped:
                    skipped += 1
                except Exception as exc:  # noqa: BLE001 - every failure is recorded
                    failed += 1
                    failures.append({"test": test, "message": "".join(
                        traceback.format_exception(type(exc), exc, exc.__traceback__))[-2000:]})
    finally:
        if saved is None:
            sys.modules.pop("pytest", None)
        else:
            sys.modules["pytest"] = saved
    return {"runner": "builtin", "passed": passed, "failed": failed, "skipped": skipped,
            "total": passed + failed + skipped, "failures": failures, "duration_s": time.monotonic() - t0}


def run_kernel_tests(test_file: str = TEST_FILE, *, timeout_s: float = 300.0, runner: str = "auto",
                     stub_dir: Path | None = None) -> dict:
    """The kernel tests' results (see the module docstring). ``runner``: ``auto``, ``pytest`` or ``builtin``."""
    extra = ensure_safetensors(stub_dir or Path(tempfile.mkdtemp(prefix="flylora-gpu-check-")))
    if runner == "auto":
        runner = "pytest" if importlib.util.find_spec("pytest") is not None else "builtin"
    result = run_with_pytest(test_file, timeout_s, extra) if runner == "pytest" else run_builtin(test_file)
    result["safetensors_standin"] = extra is not None
    return result
