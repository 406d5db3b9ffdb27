"""Real runs: shared caches on a cluster, caches that verify what they read, W&B that never stalls, reruns that start
clean, names that say what ran, no foreign code, the model card's files, one line per bad input."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose, run_in_process

from wandb_offline import read_run

from krea_sweeps.tokenizer import default_cache_dir


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------ 4. shared caches on a cluster
def test_three_processes_on_an_empty_cache_all_succeed_and_leave_no_temporary(tmp_path):
    cache = tmp_path / "cache"
    code = ("from krea_sweeps.synthetic import ensure_synthetic_checkpoints; "
            "from krea_sweeps.tokenizer import load_qwen_tokenizer; "
            "root = ensure_synthetic_checkpoints(); load_qwen_tokenizer(); print(root)")
    env = {**os.environ, "KREA_SWEEPS_CACHE": str(cache), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    root = Path(outs[0][0].strip())
    assert (root / "COMPLETE").exists() and (cache / "qwen_tokenizer" / "tokenizer.json").exists()
    assert _temporaries(cache) == []


def test_a_full_disk_during_the_synthetic_build_leaves_no_temporary(tmp_path, monkeypatch):
    from krea_sweeps import synthetic
    from krea_sweeps.tokenizer import load_qwen_tokenizer

    load_qwen_tokenizer()  # the shared one, so the copy below is quick
    cache = tmp_path / "cache"
    shutil.copytree(default_cache_dir() / "qwen_tokenizer", cache / "qwen_tokenizer")

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "build_vae", full_disk)
    with pytest.raises(OSError, match="No space"):
        synthetic.ensure_synthetic_checkpoints(cache)
    assert not synthetic.synthetic_root(cache).exists()
    assert _temporaries(cache) == []


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    from krea_sweeps.files import atomic_write

    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 5. caches verify what they read
def _flip_last_bytes(file: Path, n: int = 16) -> None:
    data = bytearray(file.read_bytes())
    for i in range(1, n + 1):
        data[-i] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "zeroed"])
def test_a_damaged_encode_cache_entry_is_recomputed_with_one_warning(turbo, tmp_path, caplog, damage):
    from krea_sweeps.prompts import EncodeCache

    first = EncodeCache(tmp_path).get(turbo, ["A red fox."], 32)
    (file,) = tmp_path.glob("*.safetensors")
    size = file.stat().st_size
    if damage == "flipped":
        _flip_last_bytes(file)
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[: size // 2])
    else:
        file.write_bytes(bytes(size))
    fresh = EncodeCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="krea_sweeps"):
        again = fresh.get(turbo, ["A red fox."], 32)
    assert fresh.misses == 1 and fresh.hits == 0  # recomputed, not read
    assert torch.equal(again.taps, first.taps) and torch.equal(again.mask, first.mask)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "recomputing" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    reread = EncodeCache(tmp_path)  # and the entry was rewritten whole
    assert torch.equal(reread.get(turbo, ["A red fox."], 32).taps, first.taps) and reread.hits == 1


def test_a_zeroed_stock_image_is_regenerated_not_used(tmp_path, caplog):
    from types import SimpleNamespace

    from krea_sweeps import task
    from krea_sweeps.session import Session

    job = SimpleNamespace(sweep_dir=tmp_path, job_dir=tmp_path / "job")
    image = np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)
    task.store_baseline(Session(), job, "k" * 24, image)
    assert np.array_equal(task.cached_baseline(Session(), job, "k" * 24), image)  # a new session: read from disk
    file = task.baseline_file(job, "k" * 24)
    file.write_bytes(bytes(file.stat().st_size))
    with caplog.at_level(logging.WARNING, logger="krea_sweeps"):
        assert task.cached_baseline(Session(), job, "k" * 24) is None  # missing ⇒ produce_images generates it again
    assert any("recomputing" in r.getMessage() for r in caplog.records)


def test_a_replaced_checkpoint_under_the_same_path_changes_the_fingerprint(tmp_path):
    from krea_sweeps.models import sources_for, ModelVariant
    from krea_sweeps.plan import plan
    from krea_sweeps.task import job_fingerprint

    synthetic = sources_for(ModelVariant(name="turbo", base="turbo"))
    checkpoint = tmp_path / "krea2.safetensors"
    shutil.copy(synthetic.transformer, checkpoint)
    overrides = ["metrics=[image_stats]", f"model.path={checkpoint}", f"model.text_encoder_path={synthetic.text_encoder}",
                 f"model.tokenizer_path={synthetic.tokenizer}", f"model.vae_path={synthetic.vae}",
                 f"model.transformer_config={synthetic.transformer_config}"]
    before = job_fingerprint(plan(compose(overrides)))
    assert job_fingerprint(plan(compose(overrides))) == before  # stable while nothing changes
    shutil.copy(sources_for(ModelVariant(name="raw", base="raw")).transformer, checkpoint)  # same path, other weights
    os.utime(checkpoint, ns=(1, 1))
    assert job_fingerprint(plan(compose(overrides))) != before


# ----------------------------------------------------------------------------------- 1. W&B never stalls a sweep
FAKE_KEY = "f" * 40
SMALL = ["prompts.prompts=[A red fox.]", "sampler.steps=1", "sampler.max_sequence_length=16", "metrics=[image_stats]"]


def _run(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600, process: bool = False, **popen):
    """`python run.py ARGS` with exactly the W&B environment given (no key unless `env` has one): in this process
    (conftest.run_in_process), or as a real process when the test is about the process (`process=True`, or Popen
    options)."""
    if not (process or popen):
        unset = {k: None for k in os.environ if k.startswith("WANDB_")}
        return run_in_process(args, cwd, env={**unset, "HOME": str(cwd), **(env or {})})
    full = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full.update({"KREA_SWEEPS_PROGRESS": "0", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO), **(env or {})})
    full["HOME"] = str(cwd)  # no ~/.netrc key from the machine running the tests
    if popen:
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=full, text=True,
                                **{**streams, **popen})
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def _offline_runs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))  # the README's `wandb sync` glob


def test_a_key_without_a_reachable_server_costs_seconds_and_logs_offline_in_one_line(tmp_path):
    import time

    (tmp_path / "nokey").mkdir()
    (tmp_path / "key").mkdir()
    long_prompt = ("prompts.prompts=[A red fox sitting in fresh snow under a pale winter sky photographed at dawn "
                   "with a long lens and soft light in muted colours with high detail]")
    args = ["-m", "seeds=0,1", *SMALL, long_prompt]  # a long fixed override must not push the swept value out
    t0 = time.perf_counter()
    plain = _run(args, tmp_path / "nokey", process=True)
    t1 = time.perf_counter()
    keyed = _run(args, tmp_path / "key", env={"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9"},
                 process=True)
    t2 = time.perf_counter()
    assert plain.returncode == 0 and keyed.returncode == 0, keyed.stderr[-3000:]
    assert (t2 - t1) - (t1 - t0) < 15, (t1 - t0, t2 - t1)
    said = [line for line in (keyed.stdout + keyed.stderr).splitlines() if "did not answer" in line]
    assert len(said) == 1 and "offline" in said[0], keyed.stdout[-2000:] + keyed.stderr[-2000:]  # once per process
    records = [json.loads(f.read_text()) for f in (tmp_path / "nokey").rglob("result.json")]
    first, second = [r["encode_cache"] for r in sorted(records, key=lambda r: r["config"]["seeds"])]
    assert first["misses"] > 0 and second == {"hits": first["misses"], "misses": 0}  # per job, not per process
    jobs = [f.parent for f in (tmp_path / "key" / "outputs" / "default").glob("*/result.json")]
    assert len(jobs) == 2
    for job in jobs:
        record = json.loads((job / "result.json").read_text())
        seed = record["config"]["seeds"]
        assert f"seeds={seed}" in job.name and len(job.name) <= 200  # 3. the swept value in full, in the name
        assert f"seeds={seed}" in read_run(_offline_runs(job)[0])["run"]["name"]  # and in the W&B run name
        assert record["wandb"]["mode"] == "offline" and record["wandb"]["dir"]
        assert len(_offline_runs(job)) == 1


def test_the_probe_gives_up_on_a_server_that_never_answers(monkeypatch):
    import socket
    import time

    from krea_sweeps import tracking

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (kernel backlog), never answers
    try:
        t0 = time.perf_counter()
        ok, why = tracking.server_answers(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert not ok and time.perf_counter() - t0 < 5
    finally:
        silent.close()


class _HangingWandbServer:
    """Answers the reachability probe (HEAD), then never answers W&B's API calls: `wandb.init` hangs in them."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.called = threading.Event()
        release = self.release = threading.Event()
        called = self.called

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(200)
                self.end_headers()

            def do_POST(self):
                called.set()
                release.wait(120)

            do_GET = do_POST

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()


def test_ctrl_c_while_wandb_starts_is_one_line_and_leaves_no_run_to_sync(tmp_path):
    import signal
    import time

    server = _HangingWandbServer()
    # Streams to files, not pipes: W&B's service process inherits them, and a pipe stays open until it exits; what a
    # user waits for at the terminal is our process.
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    try:
        with out_file.open("w") as out_stream, err_file.open("w") as err_stream:
            proc = _run([*SMALL, "wandb.mode=online"], tmp_path,
                        env={"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": server.url}, stdout=out_stream,
                        stderr=err_stream, start_new_session=True)  # own process group: Ctrl-C reaches W&B's service too
            assert server.called.wait(180), "wandb.init never reached the server"
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic()
            proc.wait(timeout=120)
            waited = time.monotonic() - sent
    finally:
        server.close()
    out, err = out_file.read_text(), err_file.read_text()
    assert proc.returncode == 130, err[-3000:]
    # W&B's teardown is bounded after a signal (process.SIGNAL_TEARDOWN_S): its service, blocked on the hanging
    # server, held the exit for init_timeout (31 s measured) before. Generous against a loaded machine.
    assert waited < 20, f"Ctrl-C took {waited:.0f} s to end the run"
    assert "Traceback" not in err and "Traceback" not in out
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGINT)")
    jobs = [d for d in (tmp_path / "outputs" / "default").iterdir() if d.is_dir()]
    for job in jobs:
        assert not (job / "result.json").exists()
        assert list((job / "wandb").glob("*run-*")) == [] if (job / "wandb").exists() else True


# ----------------------------------------------------------------------------- 2. a rerun starts from an empty folder
def test_a_rerun_leaves_one_wandb_run_and_no_stale_files(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue whale\na green frog\n")
    args = ["prompts=file", f"prompts.path={prompts}", "sampler.steps=1", "sampler.max_sequence_length=16",
            "metrics=[refiner_attention,image_stats]", "wandb.mode=offline"]
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (job,) = [d for d in (tmp_path / "outputs" / "default").iterdir() if d.is_dir() and not d.name.startswith("_")]
    assert list(job.rglob("*p02*")) and len(_offline_runs(job)) == 1
    prompts.write_text("a red fox\na blue whale\n")  # same command, same folder, one prompt fewer
    second = _run(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((job / "result.json").read_text())["job"]["prompts"] == ["a red fox", "a blue whale"]
    assert list(job.rglob("*p02*")) == []  # no stale arrays or images from the 3-prompt run
    assert len(_offline_runs(job)) == 1 and len(list(job.rglob("*.wandb"))) == 1


# ------------------------------------------------------------------------------ 8. no foreign code from configs/results
def test_collect_on_a_crafted_result_runs_nothing_from_it(tmp_path):
    from test_collect import write_job

    from krea_sweeps.collect import main as collect_main

    victim, written = tmp_path / "victim.txt", tmp_path / "pwned.txt"
    victim.write_text("x")
    call = {"_target_": "shutil.copy", "src": str(victim), "dst": str(written)}
    sweep = tmp_path / "outputs" / "crafted"
    job = write_job(sweep, 0, "done")
    record = json.loads((job / "result.json").read_text())
    for key in ("model", "sampler", "prompts", "intervention", "wandb"):
        record["config"][key] = {**call, "nested": dict(call)}
    record["job"]["sampler_resolved"] = {"steps": 1}
    record["baseline_keys"] = {"p00_s0": "../../victim"}
    (job / "result.json").write_text(json.dumps(record))
    (job / ".hydra" / "config.yaml").write_text(json.dumps(record["config"]))
    (sweep / "_baselines").mkdir()
    assert collect_main([str(sweep), "--wandb", "disabled"]) == 0
    assert not written.exists()


@pytest.mark.parametrize("override, key", [
    ("interventions=[{_target_: shutil.copy, src: VICTIM, dst: WRITTEN}]", "interventions[0]._target_"),
    ("+metrics.x={_target_: shutil.copy, src: VICTIM, dst: WRITTEN}", "metrics.x._target_"),
    ("intervention._target_=shutil.copy", "intervention._target_"),
    ("+intervention.inner={_target_: shutil.copy, src: VICTIM, dst: WRITTEN}", "intervention.inner._target_"),
    ("model._target_=pathlib.Path", "model._target_"),
])
def test_a_target_outside_our_base_classes_is_refused_before_it_is_called(tmp_path, override, key):
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import plan

    victim, written = tmp_path / "victim.txt", tmp_path / "pwned.txt"
    victim.write_text("x")
    override = override.replace("VICTIM", str(victim)).replace("WRITTEN", str(written))
    with pytest.raises(ConfigError) as err:
        plan(compose([override]))
    assert err.value.key == key and "\n" not in str(err.value) and "subclass" in str(err.value)
    assert not written.exists()


def test_a_users_own_subclass_in_their_own_module_is_accepted(tmp_path, monkeypatch):
    from krea_sweeps.plan import plan

    (tmp_path / "my_interventions.py").write_text(
        "from krea_sweeps.interventions import Solo\n\nclass MySolo(Solo):\n    '''A user's own intervention.'''\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    job = plan(compose(["intervention=solo", "intervention._target_=my_interventions.MySolo", "intervention.slot=3"]))
    assert type(job.interventions[0]).__name__ == "MySolo"


@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", ".."])
def test_name_cannot_leave_outputs(tmp_path, name):
    r = _run([f"name={name}", *SMALL, "wandb.mode=disabled"], tmp_path)
    assert r.returncode == 2 and "config key `name`" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere (cwd holds no outputs/)


def test_a_rejected_single_run_leaves_the_finished_job_untouched(tmp_path):
    args = [*SMALL, "wandb.mode=disabled"]
    assert _run(args, tmp_path).returncode == 0
    (job,) = [d for d in (tmp_path / "outputs" / "default").iterdir() if not d.name.startswith("_")]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in job.rglob("*") if p.is_file()}
    assert (job / ".hydra" / "config.yaml").exists() and (job / "result.json").exists()
    rejected = _run([*SMALL, "wandb.mode=bogus"], tmp_path)  # wandb.* stays out of the folder name: same folder
    assert rejected.returncode == 2 and "wandb.mode" in rejected.stderr
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in job.rglob("*") if p.is_file()}
    assert after == before


# ------------------------------------------------------------------------------------------ 9. model-card files load
@pytest.mark.parametrize("metadata", [
    {"krea2_explorations": "1", "gains": "0,0,0,0,0,0,1,0,0,0,0,0", "isolate_band": "6", "qwen_layer": "20",
     "solo_gain": "1.0"},  # as the model card toolkit writes it: gains as comma-separated text
    None,  # metadata is optional: the tensor is what is applied
])
def test_a_model_card_toolkit_file_loads_and_applies_w_times_g(turbo, tmp_path, metadata):
    from safetensors.torch import save_file

    from krea_sweeps.interventions import DIFF_KEY, LoraFile
    from krea_sweeps.plan import plan

    assert DIFF_KEY == "diffusion_model.txtfusion.projector.diff"
    weight = turbo.text_path.text_fusion.projector.weight.detach().float()
    gains = torch.zeros(1, 12)
    gains[0, 6] = 1.0
    file = tmp_path / "projector_solo_b06_L20.safetensors"
    save_file({DIFF_KEY: (weight * gains - weight).float().contiguous()}, str(file), metadata=metadata)
    lora = LoraFile(path=str(file))
    assert torch.equal(lora.effective_weight(weight), weight * gains)
    described = lora.describe()
    if metadata:
        assert described["file_gains"] == [float(g) for g in gains[0]]
        assert described["qwen_layer"] == "20" and described["isolate_band"] == "6"
    else:
        assert described["file_gains"] is None
    job = plan(compose(["intervention=lora_file", f"intervention.path={file}", "metrics=[projector]"]))
    assert type(job.interventions[0]) is LoraFile


def test_names_keep_swept_values_and_leave_out_long_fixed_ones(monkeypatch):
    from krea_sweeps.plan import MAX_READABLE, SWEPT_KEYS_ENV, job_slug

    long = "prompts.path=" + "/very/long/folder" * 12 + "/prompts.txt"
    dirname = f"{long},intervention.gains=[0.5,1,1,1,1,1,1,1,1,1,1,2],seeds=0"
    monkeypatch.setenv(SWEPT_KEYS_ENV, "intervention.gains,seeds")
    name = job_slug(dirname)
    assert name.startswith("intervention.gains=_0.5,1,1,1,1,1,1,1,1,1,1,2_,seeds=0-") and "very" not in name
    assert job_slug(dirname.replace("seeds=0", "seeds=1")) != name  # hash of everything: unique
    assert job_slug("seeds=0,sampler.steps=2").startswith("sampler.steps=2,seeds=0-")  # short: all of it, sorted
    monkeypatch.setenv(SWEPT_KEYS_ENV, "prompts.path")
    assert len(job_slug(dirname)) <= MAX_READABLE + 9  # a swept value longer than a file name allows is cut


# ------------------------------------------------------------------------------- 10. one line for every bad input
def _synthetic_single_file_args() -> list[str]:
    from krea_sweeps.models import ModelVariant, sources_for

    s = sources_for(ModelVariant(name="raw", base="raw"))
    return [f"model.path={s.transformer}", f"model.text_encoder_path={s.text_encoder}",
            f"model.tokenizer_path={s.tokenizer}", f"model.vae_path={s.vae}",
            f"model.transformer_config={s.transformer_config}"]


BAD_INPUTS = {
    "device": (["model.device=tpu"], "model.device"),
    "lora_missing": (["model=turbo_lora", "SINGLE_FILE", "model.lora_path=TMP/missing.safetensors"],
                     "model.lora_path"),
    "lora_unreadable": (["model=turbo_lora", "SINGLE_FILE", "model.lora_path=TMP/a_folder"], "model.lora_path"),
    "lora_on_synthetic": (["model=turbo_lora", "model.lora_path=TMP/lora.safetensors"], "model.lora_path"),
    "max_sequence_length": (["sampler.max_sequence_length=5000000"], "sampler.max_sequence_length"),
    "force": (["force=maybe"], "force"),
    "clip_score": (["metrics=[clip_score]", "metrics.clip_score.path=null"], "metrics.clip_score.path"),
    "prompt_file_folder": (["prompts=file", "prompts.path=TMP/a_folder"], "prompts.path"),
    "lora_file_folder": (["intervention=lora_file", "intervention.path=TMP/a_folder"], "intervention.path"),
    "read_only_sweep": (["READ_ONLY"], "name"),
    "export_out_is_a_file": (["EXPORT", "--out", "TMP/lora.safetensors"], "--out"),
    "export_bad_rebalance": (["EXPORT", "--out", "TMP/exports", "--rebalance", "1,2,3"], "--rebalance"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_bad_input_is_one_line_naming_its_key_and_writes_nothing(tmp_path, monkeypatch, case):
    args, key = BAD_INPUTS[case]
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "lora.safetensors").write_bytes(b"not used")
    if "READ_ONLY" in args:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "outputs" / "default").mkdir(parents=True)
        (tmp_path / "outputs" / "default").chmod(0o555)
        args = [*SMALL, "wandb.mode=disabled"]
    if "SINGLE_FILE" in args:
        args = [a for a in args if a != "SINGLE_FILE"] + _synthetic_single_file_args()
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if args[0] == "EXPORT":  # krea-export's entry point, in this process
        import contextlib
        import io

        from krea_sweeps.export import main as export_main

        out, err = io.StringIO(), io.StringIO()
        monkeypatch.chdir(tmp_path)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = export_main(args[1:])
        r = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    else:
        r = _run(args, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert f"config key `{key}`" in lines[0] and "Traceback" not in r.stdout + r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert (tmp_path / "lora.safetensors").read_bytes() == b"not used"


def test_an_over_long_prompt_is_reported_per_prompt_and_stored_once(tmp_path):
    long_prompt = " ".join(["a red fox in the snow"] * 40)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a lighthouse\n{long_prompt}\n")
    r = _run(["prompts=file", f"prompts.path={prompts}", "sampler.steps=1", "sampler.max_sequence_length=32",
              "metrics=[projector]", "wandb.mode=disabled"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in (r.stdout + r.stderr).splitlines() if "cut to sampler.max_sequence_length" in line]
    assert len(said) == 1 and "prompt 1:" in said[0] and "prompt 0:" not in said[0]
    (result,) = tmp_path.rglob("result.json")
    record = json.loads(result.read_text())
    cut = record["truncated_tokens"]
    assert cut[0] == 0 and cut[1] > 100
    assert record["job"]["prompts"][1] == long_prompt and long_prompt not in json.dumps(record["config"])  # not 3×
    again = _run(["prompts=file", f"prompts.path={prompts}", "sampler.steps=1", "sampler.max_sequence_length=32",
                  "metrics=[projector]", "wandb.mode=disabled"], tmp_path)  # every prompt from the encode cache now
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(result.read_text())["truncated_tokens"] == cut


def test_a_read_only_sweep_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    """The CLI case above needs a non-root user; here the permission check itself, as root sees it too."""
    from krea_sweeps import sweeps
    from krea_sweeps.errors import ConfigError

    folder = tmp_path / "outputs" / "default"
    folder.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(sweeps.os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    with pytest.raises(ConfigError) as err:
        sweeps.check_writable(folder)
    assert err.value.key == "name" and "not a writable folder" in str(err.value)
    sweeps.check_writable(tmp_path / "outputs" / "new")  # a folder still to be made, under a writable one
