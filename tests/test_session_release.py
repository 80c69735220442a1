"""Sessions are released when they close: measured on a real server process.

`launch.py` runs in a subprocess (so its resident memory is the server's alone) on the bundled
SmolLM2-135M when it is installed, else on a random Llama of ~100M parameters saved to a temp
folder. Four gradio_client sessions each calibrate (magnitude: ranks of every weight, ~0.4 GB
for SmolLM2-135M), export their masks (a ~0.1 GB file in the session's folder) and close. Their
unload events must release it all: the server's RSS comes back to within 300 MB of what it was
before them and their folders are gone; after the server stops, nothing of its is left on disk.

Without the release (gradio keeps a closed session's state for an hour, and never deletes a
State it did not store) the same run ends ~2 GB above the baseline on SmolLM2-135M.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from support import REPO, free_port  # noqa: E402

SESSIONS = 4
TOLERANCE = 300 * 2**20
RELEASE_WAIT_S = 90


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _model_spec(tmp_path_factory) -> str:
    from core.bundled import BUNDLED

    if BUNDLED["smollm2-135m"].gguf_path() is not None:
        return "smollm2-135m"
    import torch
    import transformers as tf

    from tiny import EOS_ID, BOS_ID, PAD_ID, VOCAB_SIZE, tiny_tokenizer

    folder = tmp_path_factory.mktemp("medium-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=576, intermediate_size=1536, num_hidden_layers=24,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                            pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """launch.py in a subprocess with its own temp folders; yields (url, process, spec, tmp, cache)."""
    spec = _model_spec(tmp_path_factory)
    root = tmp_path_factory.mktemp("server")
    tmp, cache = root / "tmp", root / "gradio-cache"
    tmp.mkdir()
    cache.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(cache), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_HEARTBEAT_INTERVAL": "1",  # a closed client is noticed within a second, not 15
           "OMP_NUM_THREADS": "2"}
    log = (root / "server.log").open("w")  # a file, not a pipe nobody reads: a full pipe would block it
    proc = subprocess.Popen([sys.executable, "launch.py", "--model", spec, "--port", str(port), "--no-autoload"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {(root / 'server.log').read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the server did not start within 180 s")
    yield url, proc, spec, tmp, cache
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def _session_folders(tmp: Path) -> list[Path]:
    return [p for root in tmp.glob("explorer-app-*") for p in root.iterdir()]


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(1)
    return predicate()


def test_closed_sessions_are_released_and_nothing_is_left(server):
    url, proc, spec, tmp, cache = server
    warm = Client(url, verbose=False, download_files=False)  # the shared model is loaded once, kept
    warm.predict(spec, "float32", "cpu", api_name="/load_model")
    warm.close()
    time.sleep(3)
    baseline = _rss(proc.pid)

    peak = baseline
    for _ in range(SESSIONS):
        client = Client(url, verbose=False, download_files=False)
        client.predict(spec, "float32", "cpu", api_name="/load_model")
        client.predict(method_name="magnitude", windows=2, seqlen=64, sparsity=0.5, api_name="/calibrate")
        exported = client.predict(api_name="/export_masks")
        assert exported, "no mask file came back"
        assert _session_folders(tmp), "the export wrote no session folder under the app's root"
        peak = max(peak, _rss(proc.pid))
        client.close()
    held = peak - baseline
    assert held > 0.2 * 2**30, f"the sessions held only {held / 2**20:.0f} MB: the test would not notice a leak"

    released = _wait_for(lambda: _rss(proc.pid) - baseline < TOLERANCE and not _session_folders(tmp),
                         RELEASE_WAIT_S)
    after = _rss(proc.pid)
    assert released, (f"server RSS {after / 2**30:.2f} GB, {(after - baseline) / 2**20:.0f} MB above the "
                      f"baseline {baseline / 2**30:.2f} GB (peak {peak / 2**30:.2f} GB) {RELEASE_WAIT_S} s after "
                      f"the sessions closed; session folders left: {_session_folders(tmp)}")
    print(f"\nserver RSS: baseline {baseline / 2**30:.2f} GB, peak {peak / 2**30:.2f} GB, "
          f"after release {after / 2**30:.2f} GB ({(after - baseline) / 2**20:+.0f} MB)")

    proc.send_signal(signal.SIGTERM)  # as a service manager stops it
    proc.wait(timeout=60)
    assert not list(tmp.glob("explorer-*")), f"left behind: {list(tmp.glob('explorer-*'))}"
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert not files, f"gradio's cache kept {files[:3]}"
