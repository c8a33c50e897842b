"""Native libraries' stderr sent to the log (cd_sfm.native_stderr): a package that writes to file descriptor 2 while
it is imported (as TensorFlow 2.21 does on AVX512 CPUs, whatever TF_CPP_MIN_LOG_LEVEL says) leaves stderr clean but
for what is not informational, which comes back as a log warning."""

import subprocess
import sys
import textwrap


def _run(tmp_path, quiet: bool) -> subprocess.CompletedProcess:
    pkg = tmp_path / "noisy_native"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(
        "import os\nos.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\\nI0000 00:00:1796647405.395806 9707 port.cc:153] oneDNN custom operations are on.\\n"
        "something went wrong\\n')\n")
    code = textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {str(tmp_path)!r})
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        from cd_sfm import native_stderr
        if {quiet}:
            native_stderr.quiet_import("noisy_native")
        import noisy_native
        import importlib; importlib.reload(noisy_native)  # a second import is not wrapped: the finder is gone
        print("finders", sum(type(f).__name__ == "_QuietImport" for f in sys.meta_path))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_quiet_import_logs_the_native_lines_once(tmp_path):
    p = _run(tmp_path, quiet=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "finders 0"
    lines = p.stderr.splitlines()
    # the first import: informational lines dropped (debug), the rest a warning; the reload: raw, as without the hook
    assert lines[0] == "WARNING something went wrong", p.stderr
    assert lines[1].startswith("WARNING: All log messages before absl") and lines[3] == "something went wrong"
    assert len(lines) == 4, p.stderr


def test_without_the_hook_the_lines_reach_stderr(tmp_path):
    p = _run(tmp_path, quiet=False)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("oneDNN custom operations") == 2 and "WARNING something" not in p.stderr
