"""The README, run: every shell command and Python block, in the README's order, in one fresh folder,
as a new user would type them (so a later block uses what an earlier one wrote: `out`, `runs/tiny`,
`my-gpt`, `out-lora`), each checked to exit 0, and what the README shows as output checked too.

Deliberately not a copy with different commands: each line runs as written, with only these
changes, all in `shrink` below and all about size: runs get a few steps instead of hundreds
(`--max-steps` / 100, `--batch-size 2`, a short sample), fine-tuning a small fraction of an epoch,
a released model's shape two layers deep, fuzzing 20 inputs per target. Besides: the placeholder
paths (`path/to/model.gguf`) name real files; the chat commands read their turns from standard
input; a TOML file the README shows is written where it says; a server runs (on the README's
port, or a free one where that is taken) until the client block that follows it has talked to
it. Not run, each for its reason (SKIPPED): the two set-up commands (.ci/run is the second; the
first's chat runs here), `pip install ".[extra]"` (checked instead: the extra exists and the test
extra has its packages), a 16-host `mpirun`, and the sanitizer build (tools/sanitize.sh: ten
minutes of its own build).

tests/test_readme.py checks that every command parses; this file checks that it works.
"""

import ast
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pyllm.hub import smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _steps() -> list[tuple[int, str, str]]:
    """(line, language, text) of every line of a bash block and every python block, in README order."""
    steps, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence in ("```bash", "```python"):
            body, start = [], i + 2
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if fence == "```python":
                steps.append((start, "python", "\n".join(body)))
            else:
                steps += [(start + n, "bash", line) for n, line in enumerate(body) if line.strip()]
        i += 1
    return steps


STEPS = _steps()


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


_COMMANDS = [_strip_comment(text) for _, language, text in STEPS if language == "bash"]
INTERRUPTED = {c for c, after in zip(_COMMANDS, _COMMANDS[1:]) if after == c + " --resume"}   # "after Ctrl-C"
STOPPED = {m.group(1) for c in _COMMANDS for m in [re.fullmatch(r"pyllm train --out (\S+) --resume", c)] if m}
SKIPPED = {   # a command's start -> why it does not run here
    "python3 -m venv .venv && .venv/bin/pip install \".[test]\"": "what .ci/run runs",
    "mpirun -n 16 -f hosts": "needs 16 hosts",
    "tools/sanitize.sh": "its own ASan build and a whole test run (about ten minutes); run by hand",
}


def shrink(command: str) -> str:
    """The command with its sizes cut so the README runs in minutes (see the module's docstring)."""
    words = shlex.split(command)
    tool = words[3] if words[:1] == ["mpirun"] else words[0]
    sub = words[words.index(tool) + 1] if tool in words[:-1] else ""
    extra = ""
    if tool == "pyllm" and sub == "train":
        if "--resume" not in words:
            steps = re.search(r"--max-steps (\d+)", command)
            if steps:
                command = command.replace(steps.group(0), f"--max-steps {max(2, int(steps.group(1)) // 100)}")
                out = re.search(r"--out (\S+)", command)
                if out and out.group(1) in STOPPED:   # a later bare --resume goes on from where it stopped
                    extra += f" --stop-at-step {max(2, int(steps.group(1)) // 100) - 2}"
            else:
                extra += " --max-steps 3"
            extra += " --batch-size 2 --eval-batches 1 --sample-tokens 8"
            if re.search(r"--preset (smollm2-135m|qwen3-0.6b|gemma3-270m)", command):
                extra += " --n-layer 2 --block-size 64"
        else:
            command = re.sub(r"--max-steps (\d+)", lambda m: f"--max-steps {int(m.group(1)) // 100}", command)
        extra += " --no-progress"
    elif tool == "pyllm" and sub == "finetune":
        epochs = 0.02 if "arith.jsonl" in command else 1   # the generated set has 300 examples
        extra += f" --batch-size 2 --epochs {epochs} --no-progress"
        if command in INTERRUPTED:
            extra += " --checkpoint-interval 1"
    elif tool == "pyllm" and sub == "eval":
        extra += " --no-progress"
    elif words[:2] == ["python", "tools/fuzz.py"]:
        extra += " --inputs 20"
    return command + extra


FIXTURES = {
    "notes/a.txt": "".join(f"Note {i}: parse the text, then check it.\n" for i in range(400)),
    "more.jsonl": "".join('{"text": "def f%d(x):\\n    return x + %d\\n"}\n' % (i, i) for i in range(400)),
    "held-out.txt": "def g(y):\n    return y * 2\n" * 20,
    "qa.jsonl": "".join('{"prompt": "What is %d + %d?", "completion": "%d"}\n' % (i, i, 2 * i) for i in range(4)),
    "chat.jsonl": "".join('{"messages": [{"role": "user", "content": "Hi %d"}, '
                          '{"role": "assistant", "content": "Hello %d."}]}\n' % (i, i) for i in range(4)),
    "prefs.jsonl": "".join('{"prompt": "2 + %d =", "chosen": " %d", "rejected": " 7"}\n' % (i, i + 2) for i in range(4)),
}
TURNS = "What is the capital of France? Answer in one sentence.\n/help\n/reset\nHello!\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The user's folder: the files the README's commands name, and `pyllm`, `python` and `mpirun`
    on PATH as this test's interpreter has them."""
    work = tmp_path_factory.mktemp("readme")
    for name, text in FIXTURES.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text, encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    for name, body in re.findall(r"```toml\n# (\S+\.toml)\b.*?\n(.*?)```", text, re.S):   # files the README shows
        (work / name).write_text(body, encoding="utf-8")
    corpus = work / "corpus"
    corpus.mkdir()
    for source in sorted((Path(os.__file__).parent / "json").glob("*.py")):
        (corpus / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    (bin_dir / "pyllm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pyllm "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    mpirun = Path(sys.executable).parent / "mpirun"
    if mpirun.exists():   # run by its own path: hydra finds its proxy beside it
        (bin_dir / "mpirun").write_text(f'#!/bin/sh\nexec "{mpirun}" "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return work


@pytest.fixture(scope="module")
def environment(folder):
    return dict(os.environ, PATH=f"{folder / '.bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                SKBUILD_EDITABLE_VERBOSE="0")   # a developer's editable install: no rebuild notes on stdout


SERVERS: dict[int, subprocess.Popen] = {}   # port -> a running `pyllm serve`
PORTS: dict[int, int] = {}                    # the README's port -> the one it runs on here


def _wait_until_serving(port: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {process.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the server on port {port} did not answer /health in 180 s")


def _port_for(port: int) -> int:
    """The README's port if nothing on this machine listens there, else a free one (the commands
    and the client block then use that one instead)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_servers(ports: list[int] | None = None) -> None:
    """Ctrl-C to each server (all by default); one that has not stopped within 30 s is killed."""
    for port in list(SERVERS) if ports is None else ports:
        process = SERVERS.pop(port)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the server on port {port} did not stop on Ctrl-C within 30 s")


def _interrupt_at_first_checkpoint(number: int, command: str, folder: Path, env: dict) -> None:
    words = shlex.split(command)
    checkpoint = folder / words[words.index("--out") + 1] / "checkpoint"
    process = subprocess.Popen(words, cwd=folder, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out = process.communicate(timeout=600)[0]
    assert process.returncode == 130, f"README line {number}: `{command}` exited {process.returncode}, not as " \
                                      f"interrupted after its first checkpoint:\n{out[-3000:]}"
    assert "--resume" in out and checkpoint.exists(), f"README line {number}: {out[-1000:]}"


def _run_bash(number: int, line: str, folder: Path, env: dict) -> None:
    command = _strip_comment(line)
    for start, why in SKIPPED.items():
        if command.startswith(start):
            pytest.skip(f"README line {number}: {why}")
    extra = re.fullmatch(r'pip install "\.\[(\w+)\]"', command)
    if extra:   # the install itself is .ci/run's; what it names must exist and be tested here
        extras = pytest.importorskip("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extra.group(1) in extras, f"README line {number}: no extra {extra.group(1)!r}"
        missing = set(extras[extra.group(1)]) - set(extras["test"])
        assert not missing, f"README line {number}: the test extra lacks {missing}, so CI never runs them"
        return
    stdin = None
    setup = re.fullmatch(r"python3 -m venv \.venv && \.venv/bin/pip install \. && \.venv/bin/(pyllm .*)", command)
    if setup:   # the main job's command, in the already installed package
        command = setup.group(1)
    words = shlex.split(command)
    if words[:2] == ["pyllm", "chat"]:
        stdin = TURNS
    if words[:2] == ["pyllm", "serve"]:
        readme_port = int(words[words.index("--port") + 1]) if "--port" in words else 8000
        port = _port_for(readme_port)
        log = folder / f"serve-{port}.log"
        with open(log, "w") as sink:   # no shell, so Ctrl-C reaches the server itself
            process = subprocess.Popen(words + ["--port", str(port)], cwd=folder, env=env, stdout=sink,
                                       stderr=subprocess.STDOUT)
        process.log = log
        SERVERS[port] = process
        PORTS[readme_port] = port
        key = words[words.index("--api-key") + 1] if "--api-key" in words else None
        _wait_until_serving(port, process)
        if key:   # the key is asked for: without it 401, with it the model list
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                             headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=10) as r:
                assert b'"out"' in r.read()
            _stop_servers([port])
        return
    cwd = ROOT if words[0].startswith("tools/") or words[:2] == ["python", "tools/fuzz.py"] else folder
    if command in INTERRUPTED:   # the next line resumes it "after Ctrl-C": press it once it has a checkpoint
        _interrupt_at_first_checkpoint(number, shrink(command), folder, env)
        return
    command = shrink(command)
    proc = subprocess.run(command, shell=True, cwd=cwd, env=env, input=stdin, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, (f"README line {number}: `{command}` exited {proc.returncode}:\n"
                                  f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    out = proc.stdout
    if words[:3] == ["pyllm", "tokenize", "decode"]:
        assert out.strip() == "def hello(): pass", f"README line {number}: decoded {out!r}"
    if words == ["pyllm", "chat"]:   # the default model, asked the README's question
        assert "Paris" in out, f"README line {number}: {out[-500:]!r}"
    if words == ["pyllm", "--version"]:
        assert out.startswith("pyllm ")


PLACEHOLDERS = {'"path/to/hf-folder"': '"my-gpt"'}
SHOWN = {   # a Python block's words -> what the README says it prints
    "What is the capital of France?": "The capital of France is Paris.",
}


def _with_shown_values_checked(code: str) -> str:
    """The block with `expression  # literal` lines turned into assertions that it is that literal."""
    out = []
    for line in code.splitlines():
        match = re.fullmatch(r"(\S.*?)\s+#\s*(.+)", line)
        if match:
            try:
                ast.parse(match.group(1), mode="eval")
                expected = ast.literal_eval(match.group(2))
            except (SyntaxError, ValueError):
                pass
            else:
                expression = match.group(1)
                message = f"README: {expression} is not {expected!r} but "
                line = f"assert ({expression}) == {expected!r}, {message!r} + repr({expression})"
        out.append(line)
    return "\n".join(out)


def _run_python(number: int, code: str, folder: Path, env: dict) -> None:
    code = code.replace('"path/to/model.gguf"', repr(str(smollm2_gguf())))
    for placeholder, real in PLACEHOLDERS.items():
        code = code.replace(placeholder, real)
    if "base_url=" in code:
        readme_port = int(re.search(r"127\.0\.0\.1:(\d+)", code).group(1))
        assert PORTS.get(readme_port) in SERVERS, \
            f"README line {number}: no `pyllm serve` on port {readme_port} before this block"
        code = code.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{PORTS[readme_port]}")
    proc = subprocess.run([sys.executable, "-c", _with_shown_values_checked(code)], cwd=folder, env=env,
                          text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, f"README line {number}: the block failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    for words, shown in SHOWN.items():
        if words in code:
            assert shown in proc.stdout, f"README line {number}: printed {proc.stdout[-500:]!r}, not {shown!r}"
    if "base_url=" in code:
        _stop_servers()


@pytest.mark.parametrize("number, language, text", STEPS, ids=[f"line{n}" for n, _, _ in STEPS])
def test_the_readme_runs(number, language, text, folder, environment):
    try:
        if language == "bash":
            _run_bash(number, text, folder, environment)
        else:
            _run_python(number, text, folder, environment)
    except BaseException:
        _stop_servers()
        raise


def test_the_readme_runs_every_kind_of_step():
    assert sum(language == "python" for _, language, _ in STEPS) >= 7
    assert sum(language == "bash" for _, language, _ in STEPS) >= 40
